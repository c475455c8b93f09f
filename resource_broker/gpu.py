"""GPU monitors: NVML (nvidia-ml-py) on NVIDIA machines, a clear no-GPU mode elsewhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    used_bytes: int
    name: str = ""


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[ProcessUse, ...] = field(default_factory=tuple)
    source: str = "nvml"

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GIB

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


class GpuUnavailable(RuntimeError):
    pass


class GpuMonitor(Protocol):
    """Reads one GPU's memory. `available` is False in no-GPU mode."""

    @property
    def available(self) -> bool: ...

    def describe(self) -> str: ...

    def read(self) -> GpuReading: ...


def settled_free_gib(monitor: GpuMonitor, *, first_wait_s: float = 1.5, poll_s: float = 0.5,
                     stable_s: float = 2.0, timeout_s: float = 15.0,
                     step_bytes: int = 64 << 20,
                     sleep: Callable[[float], None] = time.sleep) -> float:
    """Free VRAM once it stopped rising for `stable_s` after a `/free`. ComfyUI acts on
    /free between prompts, after it has answered, and lets the models go one by one: in the
    H100 soaks a reading 1 s after it still found up to both experts in use; the free memory
    stood still for 0.5 s with one expert (13.6 GiB) held after 2 of 5 unloads, while the
    other 3 released everything 2.5 to 3 s after the /free (soak10-settle)."""
    sleep(first_wait_s)
    best = monitor.read().free_bytes
    still = 0.0
    for _ in range(max(1, int(timeout_s / poll_s))):
        sleep(poll_s)
        now = monitor.read().free_bytes
        still = still + poll_s if now <= best + step_bytes else 0.0
        best = max(best, now)
        if still >= stable_s:
            break
    return best / GIB


class NoGpuMonitor:
    """Machines without NVIDIA: the broker still plans, but takes no GPU actions."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @property
    def available(self) -> bool:
        return False

    def describe(self) -> str:
        return f"no GPU ({self.reason}); the broker plans but takes no GPU actions"

    def read(self) -> GpuReading:
        raise GpuUnavailable(self.describe())


class NvmlMonitor:
    def __init__(self, index: int = 0) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            raise GpuUnavailable(f"GPU index {index} does not exist; this machine has {count} "
                                 f"NVIDIA GPU{'s' if count != 1 else ''} (0..{count - 1})")
        self.index = index
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)

    @property
    def available(self) -> bool:
        return True

    def describe(self) -> str:
        r = self.read()
        return (f"GPU {self.index}: {self.name}, {r.total_gib:.1f} GiB total, "
                f"{r.free_gib:.1f} GiB free (NVML)")

    def _processes(self) -> tuple[ProcessUse, ...]:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return ()  # not allowed in containers or on some drivers
        return tuple(ProcessUse(p.pid, int(p.usedGpuMemory or 0)) for p in procs)

    def read(self) -> GpuReading:
        try:
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as err:
            raise GpuUnavailable(f"NVML failed reading GPU {self.index}: {err}") from err
        return GpuReading(self.index, self.name, int(mem.total), int(mem.used), int(mem.free),
                          self._processes())


def open_monitor(index: int = 0) -> GpuMonitor:
    """NVML when it works, else the no-GPU mode with the reason."""
    try:
        return NvmlMonitor(index)
    except GpuUnavailable:
        raise
    except Exception as err:  # pynvml raises NVMLError_LibraryNotFound etc. without NVIDIA
        log.info("NVML not usable (%s): no-GPU mode", err)
        return NoGpuMonitor(f"NVML: {err}")
