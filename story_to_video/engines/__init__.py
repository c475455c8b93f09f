"""Video engines behind the VideoEngine protocol."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..models import ShotPlan
from .base import ClipResult, EngineStatus, Progress, VideoEngine, VideoEngineError
from .preview import PreviewEngine

__all__ = ["ClipResult", "EngineStatus", "PreviewEngine", "Progress", "VideoEngine",
           "VideoEngineError", "make_engine"]


def make_engine(settings: Settings, plan: ShotPlan | None = None,
                log_dir: Path | None = None) -> VideoEngine:
    """The configured engine; `log_dir` (the run folder) gets comfyui.log when the project
    starts ComfyUI itself."""
    titles = {s.index: s.title for s in plan.scenes} if plan else {}
    if settings.engine == "preview":
        return PreviewEngine(titles)
    from .comfyui import ComfyUIEngine

    return ComfyUIEngine.from_settings(settings, log_dir)
