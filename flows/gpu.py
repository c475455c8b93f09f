"""GPU side of a run: one heavy job per GPU, the broker wired to the engine, VRAM timeline."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect.concurrency.sync import concurrency

from resource_broker.broker import Broker
from resource_broker.gpu import GIB, GpuMonitor, GpuUnavailable, NoGpuMonitor, open_monitor
from resource_broker.llm_control import (
    LlamaServerControl,
    LLMControl,
    LMStudioControl,
    NoLLM,
    OllamaControl,
    UncontrolledLLM,
)
from resource_broker.session import calibration_path, make_broker
from resource_broker.timeline import VramSampler
from story_to_video.config import Settings
from story_to_video.engines.base import VideoEngine
from story_to_video.engines.comfyui import ComfyUIEngine
from story_to_video.llm.embedded import LLMServer

log = logging.getLogger("resource_broker.session")


def llm_control(settings: Settings, server: LLMServer | None = None) -> LLMControl:
    """How the broker moves this LLM: a server the project started is restarted with other
    GPU layers; LM Studio and Ollama through their APIs; anything else is counted as taken."""
    cfg, gib = settings.llm, settings.broker.llm_gib
    if server is not None and server.running:
        return LlamaServerControl(server, gib)
    if cfg.backend == "llamacpp-embedded" or cfg.server_command:
        return NoLLM()  # the project's server was stopped after planning
    if cfg.backend == "ollama" and cfg.model:
        return OllamaControl(cfg.resolved_base_url() or "", cfg.model, gib)
    if cfg.backend == "lmstudio":
        return LMStudioControl(cfg.resolved_base_url() or "", cfg.model, gib,
                               api_key=cfg.api_key() if cfg.api_key_env else None)
    return UncontrolledLLM(cfg.backend, gib)


def gpu_limit_name(index: int) -> str:
    """The Prefect limit that mirrors one card: named per host, since GPU 0 of one host is
    not GPU 0 of another."""
    host = "".join(ch if ch.isalnum() else "-" for ch in socket.gethostname().lower())
    return f"gpu-{host}-{index}"


def ensure_gpu_limit(name: str) -> None:
    """Create the global concurrency limit (1 slot) if it does not exist yet, and clear
    slots left occupied by a killed run. Only called while holding the card's host lock, so
    any occupied slot belongs to a process that is gone (Prefect's lease repossessor does
    not run in every server mode, and its leases live in the server's memory)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # read first: a failed create logs a traceback on the server
            with contextlib.suppress(ObjectAlreadyExists):  # another worker was faster
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1))
            return
        if limit.active_slots:
            log.warning("concurrency limit %s had %d slot(s) held by a run that is gone; "
                        "released", name, limit.active_slots)
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(active_slots=0))


@contextlib.contextmanager
def host_gpu_lock(index: int, lock_dir: Path | None = None) -> Iterator[None]:
    """One heavy job per card on this host: an exclusive lock the kernel releases when the
    holder dies, so a run killed at 3 a.m. never blocks the next one."""
    folder = lock_dir or Path(tempfile.gettempdir()) / "story-to-video"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"gpu-{index}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            log.info("GPU %d is busy (%s); waiting for it", index,
                     fh.read().strip() or "held by another run")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prefect_api_configured() -> bool:
    """A real Prefect server (workers, the UI); not the temporary one of a local run."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def gpu_slot(settings: Settings, engine: VideoEngine) -> Iterator[None]:
    """Hold the card for the video work, so two runs never share it: the host lock always,
    and the Prefect limit `gpu-<host>-<index>` too when a Prefect server is in use, where
    the UI shows it."""
    if engine.is_preview or not settings.broker.concurrency_limit:
        yield
        return
    index = settings.broker.gpu_index
    with host_gpu_lock(index):
        if not prefect_api_configured():
            yield
            return
        name = gpu_limit_name(index)
        ensure_gpu_limit(name)
        with concurrency(name, occupy=1):
            yield


@dataclass
class GpuSession:
    broker: Broker | None
    sampler: VramSampler


@contextlib.contextmanager
def gpu_session(settings: Settings, engine: VideoEngine, run_dir: Path,
                llm: LLMControl | None = None) -> Iterator[GpuSession]:
    """Monitor + broker + VRAM sampler around the video work; writes the timeline plot."""
    monitor: GpuMonitor = (NoGpuMonitor("preview engine: no GPU work") if engine.is_preview
                           else open_monitor(settings.broker.gpu_index))
    log.info("GPU: %s", monitor.describe())
    sampler = VramSampler(monitor, settings.broker.sample_interval_s)
    broker = None
    if isinstance(engine, ComfyUIEngine):
        client = engine.client

        def from_system_stats() -> tuple[float, float]:
            dev = client.system_stats()["devices"][0]
            if dev.get("type") == "cpu":  # a CPU server reports RAM there, not VRAM
                raise GpuUnavailable("ComfyUI runs on the CPU: no VRAM to sample")
            return ((dev["vram_total"] - dev["vram_free"]) / GIB, dev["vram_free"] / GIB)

        sampler.fallback = from_system_stats
        engine.timeline = sampler.timeline
        calibration_file = calibration_path(engine, run_dir.parent)
        broker = make_broker(settings, engine, monitor,
                             llm if llm is not None else llm_control(settings),
                             calibration_file)
    with sampler:
        yield GpuSession(broker, sampler)
    if broker is not None and broker.acts:
        broker.cost.calibration.save(calibration_file)  # measured peaks refine the next run
