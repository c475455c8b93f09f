"""Video engines behind the VideoEngine protocol."""

from __future__ import annotations

from ..config import Settings
from ..models import ShotPlan
from .base import ClipResult, EngineStatus, Progress, VideoEngine, VideoEngineError
from .preview import PreviewEngine

__all__ = ["ClipResult", "EngineStatus", "PreviewEngine", "Progress", "VideoEngine",
           "VideoEngineError", "make_engine"]


def make_engine(settings: Settings, plan: ShotPlan | None = None) -> VideoEngine:
    titles = {s.index: s.title for s in plan.scenes} if plan else {}
    if settings.engine == "preview":
        return PreviewEngine(titles)
    from .comfyui import ComfyUIEngine

    return ComfyUIEngine.from_settings(settings)
