"""A GPU worker: one `prefect worker start` bound to one GPU (and its ComfyUI), and the
identity every shot record carries (which worker, host and GPU made it).

`story-to-video worker --gpu N` checks the GPU before the worker starts, so a worker told a
GPU that does not exist never takes a run; then it runs `prefect worker start` with the
GPU in its own environment (`CUDA_VISIBLE_DEVICES`, `STV_BROKER__GPU_INDEX`, the ComfyUI
URL), polling the pool's default queue (where the overnight run lands) and a queue of its
own, named after the worker, to which the overnight run sends its shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any

from resource_broker.gpu import GpuUnavailable, NvmlMonitor

WORKER_NAME_ENV = "STV_WORKER_NAME"


def made_by() -> dict[str, Any]:
    """Who renders here: the worker's name (or host:pid outside a worker), host, GPU."""
    host = socket.gethostname()
    gpu = os.environ.get("STV_BROKER__GPU_INDEX")
    return {"worker": os.environ.get(WORKER_NAME_ENV) or f"{host}:{os.getpid()}",
            "host": host, "gpu": int(gpu) if gpu and gpu.isdigit() else 0}


def default_name(gpu: int) -> str:
    host = "".join(ch if ch.isalnum() else "-" for ch in socket.gethostname().lower())
    return f"{host}-gpu{gpu}"


def gpu_count(configured: int | None) -> tuple[int | None, str]:
    """GPUs on this host: NVML's count, else the configured `broker.gpu_count`; None when
    neither can tell. The second value says where the count came from."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount()), "NVML"
    except Exception as err:  # no NVIDIA driver here
        if configured is not None:
            return configured, "broker.gpu_count (no NVML here)"
        return None, f"NVML not usable ({err}) and broker.gpu_count not set"


def check_gpu(index: int, configured_count: int | None) -> str:
    """Raise GpuUnavailable for a GPU this host does not have; else one line saying how the
    GPU was checked."""
    count, source = gpu_count(configured_count)
    host = socket.gethostname()
    if count is None:
        return f"GPU {index} not checked: {source}"
    if not 0 <= index < count:
        have = f"GPUs 0..{count - 1}" if count else "no GPU"
        raise GpuUnavailable(f"GPU index {index} does not exist on {host}: it has {have} "
                             f"({source}); the worker was not started and takes no run")
    if source == "NVML":
        NvmlMonitor(index)  # opens the card: a broken one fails here, not in a run
    return f"GPU {index} of {count} on {host} ({source})"


def hold_gpu_marker(index: int, name: str, lock_dir: Path | None = None
                    ) -> tuple[IO[str], str | None]:
    """Mark GPU `index` of this host as having a worker, for as long as this process lives
    (the kernel drops the lock when it dies). Returns the open marker, and the name of the
    worker that already has this GPU, if any: both may run, but the per-GPU limit gives
    the card to one heavy job at a time."""
    folder = lock_dir or Path(tempfile.gettempdir()) / "story-to-video"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"worker-gpu-{index}.lock"
    fh = open(path, "a+")  # noqa: SIM115 - held open for the life of the worker
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        return fh, fh.read().strip() or "another worker"
    fh.seek(0)
    fh.truncate()
    fh.write(f"{name} (pid {os.getpid()})")
    fh.flush()
    return fh, None


def worker_env(gpu: int, name: str, comfyui_url: str | None,
               base: dict[str, str]) -> dict[str, str]:
    """The worker's environment; its flow runs inherit it."""
    env = dict(base)
    env["STV_BROKER__GPU_INDEX"] = str(gpu)
    env.setdefault("CUDA_VISIBLE_DEVICES", str(gpu))
    env[WORKER_NAME_ENV] = name
    if comfyui_url:
        env["STV_COMFYUI__URL"] = comfyui_url
    return env


def ensure_queue(pool: str, queue: str) -> None:
    """Create the worker's own queue in the pool (a worker does not create the queues it
    polls); a pool that does not exist is bad input."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from .run import InputError

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise InputError(f"work pool {pool!r} does not exist: prefect work-pool create "
                             f"{pool} --type process") from None
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_queue(name=queue, work_pool_name=pool,
                                     description="one GPU worker's own queue: overnight "
                                     "shards for it (story-to-video worker)")
