"""The video-engine seam: turn one shot into one clip file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..models import Shot


@dataclass(frozen=True)
class Progress:
    shot_id: str
    step: int
    total: int
    node: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass
class ClipResult:
    path: Path
    frames: int
    fps: int
    width: int
    height: int
    seconds: float
    engine: str
    preview: bool
    cached: bool = False  # answered from the engine's cache, not generated now
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name
        return d


@dataclass(frozen=True)
class EngineStatus:
    ok: bool
    detail: str


class VideoEngineError(RuntimeError):
    """Rendering a shot failed; the message says where and why."""


class VideoEngine(Protocol):
    name: str
    is_preview: bool

    def fingerprint(self) -> str:
        """Changes when the engine's output for the same shot would change (resume key)."""
        ...

    def check(self) -> EngineStatus: ...

    def check_shots(self, shots: list[Shot]) -> None:
        """Refuse, before any work, shots this engine cannot render (VideoEngineError)."""
        ...

    def render(
        self, shot: Shot, out_path: Path, progress: ProgressCallback | None = None
    ) -> ClipResult: ...

    def after_shot(self, shot: Shot) -> None:
        """Between shots: housekeeping such as restarts (no-op where nothing is needed)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PassMajorEngine(Protocol):
    """An engine that can render a batch pass by pass (every high-noise pass, then every
    low-noise pass, then every decode), loading each expert once per batch."""

    def can_pass_major(self) -> bool: ...

    def pass_major_refusal(self, shots: int) -> str | None:
        """Why this server cannot keep a batch's stages apart (its cache), or None."""
        ...

    def render_pass_major(self, shots: list[Shot], out_paths: list[Path],
                          progress: ProgressCallback | None = None) -> list[ClipResult]: ...
