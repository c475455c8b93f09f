"""The `comfyui` engine: Wan workflows over ComfyUI's real protocol, one clip per shot."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...atomic import atomic_path
from ...config import Settings
from ...models import Shot
from ..base import ClipResult, EngineStatus, Progress, ProgressCallback
from ..video_io import probe
from .client import ComfyUIClient, Execution
from .errors import ComfyUIDied, ComfyUIError, GpuOutOfMemory, StallError, WorkflowError
from .graph import Stage, split_stages, use_tiled_decode
from .process import AttachedComfyUI, ComfyUIProcess, ComfyUIServer
from .workflow import BoundWorkflow

if TYPE_CHECKING:
    from resource_broker.broker import Broker
    from resource_broker.policy import BrokerPlan
    from resource_broker.timeline import Timeline

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
        self.broker: Broker | None = None
        self.timeline: Timeline | None = None

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
        # Stable across processes (resume keys): no hash(), which Python salts per process.
        extra = json.dumps(self.extra_inputs, sort_keys=True, default=str).encode()
        return f"comfyui-{self.bound.fingerprint()}-{hashlib.sha256(extra).hexdigest()[:8]}"

    def _start_server(self) -> bool:
        """Start (or attach to) ComfyUI once; True the first time."""
        if self._started:
            return False
        self.server.start()
        self._started = True
        return True

    def _ensure_started(self) -> None:
        if self._start_server():
            self.preflight()  # a missing node or model file: one clear error, no GPU time

    def check(self) -> EngineStatus:
        try:
            self._start_server()
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
        try:
            return self._render(shot, out_path, progress)
        except GpuOutOfMemory as err:
            if self.broker is None:
                raise
            # Not a blind retry: the broker plans leaner (smaller budget) and we try once.
            self.broker.shrink_after_oom(shot.id, str(err))
            self.client.free(unload_models=True, free_memory=True)
            return self._render(shot, out_path, progress)

    def _render(self, shot: Shot, out_path: Path,
                progress: ProgressCallback | None) -> ClipResult:
        self._ensure_started()
        t_start = self._now()
        prompt = self.bound.bind(shot, **self.extra_inputs)
        if shot.start_image and "start_image" in self.bound.binding.inputs:
            name = self.client.upload_image(Path(shot.start_image))
            for node, inp in self.bound.binding.inputs["start_image"]:
                prompt[node]["inputs"][inp] = name
        if self.force_fresh:
            self.client.free(unload_models=False, free_memory=True)  # resets ComfyUI's cache
        plan = self.broker.plan(shot.frames, shot.width, shot.height, shot.id) \
            if self.broker else None
        stage_seconds: dict[str, float] = {}
        if plan is not None:
            self._apply_block_swap(prompt, plan, shot.id)
        if plan is not None and self._staged(plan):
            ex = self._render_staged(shot, prompt, plan, progress, stage_seconds)
        else:
            if plan is not None:
                prompt = self._apply_planned_decode(prompt, plan, shot.id)
            ex = self._run_with_restarts(shot, prompt, progress)
            stage_seconds["all"] = round(ex.seconds, 2)
        cached = self._was_cached(ex)
        item = output_file(ex.outputs, self.bound.binding.nodes.output)
        self._download(item, out_path)
        got = probe(out_path)
        if got.frames != shot.frames or (got.width, got.height) != (shot.width, shot.height):
            bad = out_path.with_suffix(".unexpected.mp4")
            out_path.replace(bad)  # kept for inspection, never taken as the shot's clip
            raise ComfyUIError(f"{shot.id}: ComfyUI returned {got.frames} frames at "
                               f"{got.width}x{got.height}, expected {shot.frames} at "
                               f"{shot.width}x{shot.height} (kept as {bad.name})")
        if cached:
            log.warning("%s: ComfyUI answered from its cache (%.2fs, no sampling); reported "
                        "as cached, not as a generation", shot.id, ex.seconds)
        details: dict[str, Any] = {"prompt_id": ex.prompt_id, "reconnects": ex.reconnects,
                                   "node_seconds": ex.node_seconds,
                                   "cached_nodes": sorted(ex.cached_nodes),
                                   "stage_seconds": stage_seconds}
        if plan is not None and self.broker is not None:
            details["vram"] = self._vram_record(plan, shot.id, t_start)
        return ClipResult(path=out_path, frames=shot.frames, fps=shot.fps, width=shot.width,
                          height=shot.height, seconds=self._now() - t_start,
                          engine=self.name, preview=False, cached=cached, details=details)

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _download(self, item: dict[str, Any], out_path: Path) -> None:
        with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
            for chunk in self.client.view(item["filename"], item.get("subfolder", ""),
                                          item.get("type", "output")):
                fh.write(chunk)

    def _apply_block_swap(self, prompt: dict[str, Any], plan: BrokerPlan, shot_id: str) -> None:
        """Set the block count the broker chose on the workflow's block-swap node, if any."""
        d = plan.decision("experts")
        if d.action != "block-swap" or self.broker is None:
            return
        from resource_broker.broker import BrokerEvent

        n = int(d.params["blocks_to_swap"])
        targets = self.bound.binding.inputs.get("blocks_to_swap", [])
        for node, inp in targets:
            prompt[node]["inputs"][inp] = n
        outcome = (f"set blocks_to_swap={n} on node(s) {', '.join(t[0] for t in targets)}"
                   if targets else "the workflow has no block-swap node bound: relying on "
                   "ComfyUI's own lowvram offload (start it with --reserve-vram)")
        self.broker.record(BrokerEvent("experts", "block-swap", d.predicted_gib,
                                       self.broker.free_gib(), d.reason, outcome, shot_id,
                                       d.params))

    def _staged(self, plan: BrokerPlan) -> bool:
        action = plan.decision("experts").action
        return self.bound.binding.two_expert and action in ("unload-high-before-low",
                                                            "block-swap")

    def _apply_planned_decode(self, prompt: dict[str, Any], plan: BrokerPlan,
                              shot_id: str) -> dict[str, Any]:
        d = plan.decision("decode")
        assert self.broker is not None
        from resource_broker.broker import BrokerEvent

        self.broker.record(BrokerEvent("decode", d.action, d.predicted_gib,
                                       self.broker.free_gib(), d.reason,
                                       "applied to the single-prompt graph", shot_id, d.params))
        if "tiled" in d.action:
            return use_tiled_decode(prompt, self.bound.binding.nodes.decode,
                                    **{k: int(d.params[k]) for k in ("tile_size", "overlap",
                                       "temporal_size", "temporal_overlap")})
        return prompt

    def _render_staged(self, shot: Shot, prompt: dict[str, Any], plan: BrokerPlan,
                       progress: ProgressCallback | None,
                       stage_seconds: dict[str, float]) -> Execution:
        """Pass 1 -> latent, unload the high-noise expert, pass 2 -> latent, check decode
        headroom, decode. Latents travel as files: /view from output, /upload to input."""
        assert self.broker is not None
        nodes = self.bound.binding.nodes
        assert nodes.high_sampler and nodes.low_sampler
        stages = split_stages(prompt, high_sampler=nodes.high_sampler,
                              low_sampler=nodes.low_sampler, decode=nodes.decode,
                              output=nodes.output, prefix=f"story-to-video/{shot.id}")
        latent: str | None = None
        ex: Execution | None = None
        for stage in stages:
            wf = dict(stage.workflow)
            if stage.name == "low":
                self.client.free(unload_models=True)  # the high-noise expert goes
                self._mark(f"{shot.id} unload high")
            if stage.name == "decode":
                choice = self.broker.decode_headroom(
                    plan, shot.id, lambda: self.client.free(unload_models=True))
                if choice.tiled:
                    wf = use_tiled_decode(wf, nodes.decode, **choice.params)
            if stage.latent_in is not None and latent is not None:
                wf[stage.latent_in] = {**wf[stage.latent_in],
                                       "inputs": {"latent": latent}}
            self._mark(f"{shot.id} {stage.name}")
            ex = self._run_with_restarts(shot, wf, progress)
            stage_seconds[stage.name] = round(ex.seconds, 2)
            if stage.latent_out is not None:
                latent = self._hand_over_latent(ex, stage, shot.id)
        assert ex is not None
        return ex

    def render_pass_major(self, shots: list[Shot], out_paths: list[Path],
                          progress: ProgressCallback | None = None) -> list[ClipResult]:
        """A batch of two-expert shots, pass by pass: every high-noise pass, then every
        low-noise pass, then every decode, so each expert is loaded once per batch instead
        of once per clip."""
        self._ensure_started()
        nodes = self.bound.binding.nodes
        if not (self.bound.binding.two_expert and nodes.high_sampler and nodes.low_sampler):
            raise WorkflowError("pass-major batching needs a two-expert workflow")
        # Keyed by position: shots of several ideas share ids (s01_sh01 in every plan).
        staged = [split_stages(self.bound.bind(s, **self.extra_inputs),
                               high_sampler=nodes.high_sampler, low_sampler=nodes.low_sampler,
                               decode=nodes.decode, output=nodes.output,
                               prefix=f"story-to-video/{s.id}") for s in shots]
        latents: dict[int, str] = {}
        started = self._now()
        finals: dict[int, Execution] = {}
        for i, phase in enumerate(("high", "low", "decode")):
            if i:
                self.client.free(unload_models=True)  # the previous pass's expert goes
            self._mark(f"pass-major {phase}")
            for n, s in enumerate(shots):
                stage = staged[n][i]
                wf = dict(stage.workflow)
                if stage.latent_in is not None:
                    wf[stage.latent_in] = {**wf[stage.latent_in],
                                           "inputs": {"latent": latents[n]}}
                if phase == "decode" and self.broker is not None:
                    p = self.broker.plan(s.frames, s.width, s.height, s.id)
                    choice = self.broker.decode_headroom(
                        p, s.id, lambda: self.client.free(unload_models=True))
                    if choice.tiled:
                        wf = use_tiled_decode(wf, nodes.decode, **choice.params)
                ex = self._run_with_restarts(s, wf, progress)
                if stage.latent_out is not None:
                    latents[n] = self._hand_over_latent(ex, stage, s.id)
                else:
                    finals[n] = ex
        results = []
        for n, (s, out) in enumerate(zip(shots, out_paths, strict=True)):
            ex = finals[n]
            self._download(output_file(ex.outputs, nodes.output), out)
            results.append(ClipResult(path=out, frames=s.frames, fps=s.fps, width=s.width,
                                      height=s.height, seconds=self._now() - started,
                                      engine=self.name, preview=False,
                                      details={"prompt_id": ex.prompt_id,
                                               "pass_major": True}))
        return results

    def can_pass_major(self) -> bool:
        return self.bound.binding.two_expert

    def _hand_over_latent(self, ex: Execution, stage: Stage, shot_id: str) -> str:
        out = ex.outputs.get(stage.latent_out or "") or {}
        items = out.get("latents") or []
        if not items:
            raise ComfyUIError(f"{shot_id}: stage {stage.name} saved no latent ({out})")
        item = items[0]
        data = b"".join(self.client.view(item["filename"], item.get("subfolder", ""),
                                         item.get("type", "output")))
        name = f"stv_{shot_id}_{stage.name}_{ex.prompt_id[:8]}.latent"
        tmp = Path(self._tmpdir()) / name
        tmp.write_bytes(data)
        try:
            return self.client.upload_image(tmp, subfolder="")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _tmpdir() -> str:
        import tempfile

        return tempfile.gettempdir()

    def _mark(self, label: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(label)

    def _vram_record(self, plan: BrokerPlan, shot_id: str, t_start: float) -> dict[str, Any]:
        assert self.broker is not None
        rec: dict[str, Any] = {"predicted_peak_gib": plan.peak_gib,
                               "plan": plan.to_json(),
                               "actions": [e.to_json() for e in self.broker.events
                                           if e.shot_id == shot_id]}
        if self.timeline is not None and self.timeline.samples:
            start = t_start - self.timeline.t0
            rec["measured_peak_gib"] = round(self.timeline.peak_used_gib(start), 2)
            rec["min_free_gib"] = round(self.timeline.min_free_gib(start), 2)
            self.broker.learn(plan, rec["measured_peak_gib"])
        return rec

    def after_shot(self, shot: Shot) -> None:
        """Between shots: the broker may restart ComfyUI (every N scenes, memory creep)."""
        if self.broker is None:
            return
        restart = self.server.restart if self.server.supervised else None
        self.broker.between_shots(shot.scene_index, shot.id,
                                  lambda: self.client.free(unload_models=True,
                                                           free_memory=True), restart)

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
