"""The `comfyui` engine: Wan workflows over ComfyUI's real protocol, one clip per shot."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ...atomic import atomic_path
from ...config import Settings
from ...models import Shot
from ..base import ClipResult, EngineStatus, Progress, ProgressCallback
from .client import ComfyUIClient, Execution
from .errors import ComfyUIDied, ComfyUIError, StallError, WorkflowError
from .process import AttachedComfyUI, ComfyUIProcess, ComfyUIServer
from .workflow import BoundWorkflow

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".gif", ".webp")
# A "generation" this fast, with no sampler progress, was answered from ComfyUI's cache.
CACHED_SECONDS = 1.0


def output_file(outputs: dict[str, Any], node: str) -> dict[str, Any]:
    """The video file an output node reported (SaveVideo: images, VHS: gifs)."""
    node_out = outputs.get(node) or {}
    for key in ("videos", "gifs", "images", "animated"):
        for item in node_out.get(key) or []:
            if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(
                    VIDEO_SUFFIXES):
                return item
    raise ComfyUIError(f"output node {node} reported no video file (outputs: {node_out})")


class ComfyUIEngine:
    name = "comfyui"
    is_preview = False

    def __init__(self, client: ComfyUIClient, bound: BoundWorkflow, server: ComfyUIServer, *,
                 stall_timeout_s: float = 600.0, shot_timeout_s: float = 3600.0,
                 max_restarts_per_shot: int = 1, force_fresh: bool = False) -> None:
        self.client, self.bound, self.server = client, bound, server
        self.stall_timeout_s, self.shot_timeout_s = stall_timeout_s, shot_timeout_s
        self.max_restarts_per_shot = max_restarts_per_shot
        self.force_fresh = force_fresh
        self._started = False
        self.extra_inputs: dict[str, Any] = {}

    @staticmethod
    def from_settings(settings: Settings, log_dir: Path | None = None) -> ComfyUIEngine:
        import workflows

        cfg = settings.comfyui
        bound = BoundWorkflow.load(workflows.binding_path(cfg.binding or cfg.workflow))
        server: ComfyUIServer
        if cfg.command:
            server = ComfyUIProcess(cfg.command, url=cfg.url, cwd=cfg.cwd,
                                    log_path=(log_dir / "comfyui.log") if log_dir else None,
                                    start_timeout_s=cfg.start_timeout_s)
        else:
            server = AttachedComfyUI(cfg.url)
        return ComfyUIEngine(ComfyUIClient(cfg.url), bound, server,
                             stall_timeout_s=cfg.stall_timeout_s,
                             shot_timeout_s=cfg.shot_timeout_s)

    def fingerprint(self) -> str:
        extra = sorted(self.extra_inputs.items())
        return f"comfyui-{self.bound.fingerprint()}-{hash(tuple(extra)) & 0xFFFF:04x}"

    def _ensure_started(self) -> None:
        if not self._started:
            self.server.start()
            self._started = True

    def check(self) -> EngineStatus:
        try:
            self._ensure_started()
            stats = self.client.system_stats()
            problems = self.bound.online_problems(self.client.object_info())
        except ComfyUIError as err:
            return EngineStatus(False, str(err))
        if problems:
            return EngineStatus(False, "; ".join(problems))
        dev = (stats.get("devices") or [{}])[0]
        return EngineStatus(True, f"ComfyUI at {self.client.url} ({dev.get('name', '?')}), "
                                  f"workflow {Path(self.bound.source).name} checks out")

    def preflight(self) -> None:
        """Refuse before any GPU time when a class, input or model file is missing."""
        status = self.check()
        if not status.ok:
            raise WorkflowError(status.detail)

    def render(self, shot: Shot, out_path: Path,
               progress: ProgressCallback | None = None) -> ClipResult:
        self._ensure_started()
        prompt = self.bound.bind(shot, **self.extra_inputs)
        if shot.start_image and "start_image" in self.bound.binding.inputs:
            name = self.client.upload_image(Path(shot.start_image))
            for node, inp in self.bound.binding.inputs["start_image"]:
                prompt[node]["inputs"][inp] = name
        if self.force_fresh:
            self.client.free(unload_models=False, free_memory=True)  # resets ComfyUI's cache
        ex = self._run_with_restarts(shot, prompt, progress)
        cached = self._was_cached(ex)
        item = output_file(ex.outputs, self.bound.binding.nodes.output)
        with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
            for chunk in self.client.view(item["filename"], item.get("subfolder", ""),
                                          item.get("type", "output")):
                fh.write(chunk)
        if cached:
            log.warning("%s: ComfyUI answered from its cache (%.2fs, no sampling); reported "
                        "as cached, not as a generation", shot.id, ex.seconds)
        return ClipResult(path=out_path, frames=shot.frames, fps=shot.fps, width=shot.width,
                          height=shot.height, seconds=ex.seconds, engine=self.name,
                          preview=False, cached=cached,
                          details={"prompt_id": ex.prompt_id, "reconnects": ex.reconnects,
                                   "node_seconds": ex.node_seconds,
                                   "cached_nodes": sorted(ex.cached_nodes)})

    def _was_cached(self, ex: Execution) -> bool:
        out = self.bound.binding.nodes.output
        if out in ex.cached_nodes:
            return True
        return ex.progress_events == 0 and ex.seconds < CACHED_SECONDS

    def _run_with_restarts(self, shot: Shot, prompt: dict[str, Any],
                           progress: ProgressCallback | None) -> Execution:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "progress" and progress is not None:
                progress(Progress(shot.id, int(data.get("value", 0)), int(data.get("max", 0)),
                                  str(data.get("node") or "")))

        attempt = 0
        while True:
            try:
                return self.client.run(prompt, on_event=on_event,
                                       stall_timeout_s=self.stall_timeout_s,
                                       total_timeout_s=self.shot_timeout_s,
                                       alive=self.server.alive)
            except (StallError, ComfyUIDied) as err:
                attempt += 1
                if not self.server.supervised or attempt > self.max_restarts_per_shot:
                    raise
                log.warning("%s: %s; restarting ComfyUI and retrying (%d/%d)", shot.id, err,
                            attempt, self.max_restarts_per_shot)
                self.server.restart(str(err))
                time.sleep(0.5)

    def close(self) -> None:
        self.server.stop()
        self.client.close()
