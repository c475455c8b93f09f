"""VRAM timeline: a background sampler of the GPU monitor, with stage marks, plus a plot."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .gpu import GIB, GpuMonitor, GpuUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    t: float
    used_gib: float
    free_gib: float
    source: str


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.t0, label))

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]

    def peak_used_gib(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((s.used_gib for s in self.window(start, end)), default=0.0)

    def rise_gib(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The most the used memory rose inside the window above its lowest point before:
        what a stage took for itself, even where the stage before it let go of memory at
        its start (ComfyUI drops the last expert when the decode prompt begins)."""
        low, rise = float("inf"), 0.0
        for s in self.window(start, end):
            low = min(low, s.used_gib)
            rise = max(rise, s.used_gib - low)
        return rise

    def min_free_gib(self, start: float = 0.0, end: float = float("inf")) -> float:
        return min((s.free_gib for s in self.window(start, end)), default=0.0)

    def plot(self, path: Path, title: str = "VRAM") -> Path | None:
        """PNG of used VRAM over time with stage boundaries marked; None without samples."""
        if not self.samples:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 3.5), dpi=100)
        ax.plot([s.t for s in self.samples], [s.used_gib for s in self.samples], lw=1.2)
        for t, label in self.marks:
            ax.axvline(t, color="grey", lw=0.6, ls="--")
            ax.text(t, ax.get_ylim()[1] * 0.98, label, rotation=90, va="top", fontsize=7)
        ax.set_xlabel("seconds")
        ax.set_ylabel("used GiB")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


class VramSampler:
    """Samples the primary monitor every `interval_s`; if it fails mid-run, says so once and
    carries on with the fallback reader (ComfyUI's /system_stats)."""

    def __init__(self, monitor: GpuMonitor, interval_s: float = 0.5,
                 fallback: Callable[[], tuple[float, float]] | None = None) -> None:
        self.monitor, self.interval_s, self.fallback = monitor, interval_s, fallback
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.degraded = False

    def read_once(self) -> Sample | None:
        t = time.monotonic() - self.timeline.t0
        if not self.degraded and self.monitor.available:
            try:
                r = self.monitor.read()
                return Sample(t, r.used_bytes / GIB, r.free_bytes / GIB, "nvml")
            except GpuUnavailable as err:
                self.degraded = True
                log.warning("GPU monitor failed (%s); using ComfyUI /system_stats from now on",
                            err)
        if self.fallback is not None:
            try:
                used, free = self.fallback()
                return Sample(t, used, free, "system_stats")
            except Exception as err:  # a sampler must never kill the run
                log.debug("fallback VRAM read failed: %s", err)
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            s = self.read_once()
            if s is not None:
                self.timeline.samples.append(s)

    def __enter__(self) -> VramSampler:
        first = self.read_once()
        if first is not None:
            self.timeline.samples.append(first)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vram-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
