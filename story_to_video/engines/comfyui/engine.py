"""The `comfyui` engine: Wan workflows over ComfyUI's real protocol, one clip per shot."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...atomic import atomic_path
from ...config import Settings
from ...models import Shot
from ..base import ClipResult, EngineStatus, Progress, ProgressCallback
from ..video_io import probe
from .client import ComfyUIClient, Execution
from .errors import (
    ComfyUIDied,
    ComfyUIError,
    ComfyUIUnavailable,
    GpuOutOfMemory,
    StallError,
    WorkflowError,
)
from .graph import (
    Stage,
    cut_optional_input,
    place_text_encoder,
    split_stages,
    use_tiled_decode,
)
from .process import AttachedComfyUI, ComfyUIProcess, ComfyUIServer
from .server_info import ServerInfo
from .workflow import BoundWorkflow

if TYPE_CHECKING:
    from resource_broker.broker import Broker
    from resource_broker.policy import BrokerPlan
    from resource_broker.timeline import Timeline

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".gif", ".webp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Handed-over latents live here in ComfyUI's output folder, and as stv_*.latent in its input.
LATENT_SUBFOLDER = "stv-latents"
LEFTOVER_AGE_S = 6 * 3600  # latents older than this on start are from crashed runs


def output_file(outputs: dict[str, Any], node: str) -> dict[str, Any]:
    """The video file an output node reported (SaveVideo: images, VHS: gifs)."""
    node_out = outputs.get(node) or {}
    for key in ("videos", "gifs", "images", "animated"):
        for item in node_out.get(key) or []:
            if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(
                    VIDEO_SUFFIXES):
                return item
    raise ComfyUIError(f"output node {node} reported no video file (outputs: {node_out})")


def comfyui_version(command: list[str], cwd: str | None) -> tuple[int, ...] | None:
    """The version of the ComfyUI a command starts, from comfyui_version.py beside its
    main.py; None when it cannot be told."""
    main = next((Path(cwd or ".") / a for a in command if a.endswith("main.py")), None)
    try:
        text = (main.parent / "comfyui_version.py").read_text() if main else ""
    except OSError:
        return None
    found = re.search(r"__version__\s*=\s*[\"']([\d.]+)", text)
    return tuple(int(x) for x in found.group(1).split(".")) if found else None


def headroom_args(settings: Settings) -> list[str]:
    """An LLM the broker cannot move keeps its VRAM all night: a ComfyUI the project starts
    is told to leave that much free (dynamic VRAM would otherwise take it; --vram-headroom
    since 0.33, --reserve-vram before)."""
    cmd, llm = settings.comfyui.command or [], settings.llm
    movable = llm.backend in ("lmstudio", "ollama", "llamacpp-embedded") or llm.server_command
    gib = settings.broker.llm_gib
    if movable or gib <= 0 or "--vram-headroom" in cmd or "--reserve-vram" in cmd:
        return []
    version = comfyui_version(cmd, settings.comfyui.cwd)
    flag = "--vram-headroom" if version is None or version >= (0, 33) else "--reserve-vram"
    log.info("LLM (%s, %.1f GiB) cannot be moved: starting ComfyUI with %s %.1f", llm.backend,
             gib, flag, gib)
    return [flag, f"{gib:g}"]


def output_image(outputs: dict[str, Any], node: str) -> dict[str, Any]:
    """The still an image output node reported (SaveImage: images)."""
    node_out = outputs.get(node) or {}
    for item in node_out.get("images") or []:
        if isinstance(item, dict) and str(item.get("filename", "")).lower().endswith(
                IMAGE_SUFFIXES):
            return item
    raise ComfyUIError(f"output node {node} reported no image file (outputs: {node_out}); "
                       "a keyframe workflow's nodes.output must save an image (SaveImage)")


def keyframe_binding(settings: Settings, video: BoundWorkflow) -> Path:
    """The keyframe workflow's binding: the user's, the named one, or the Wan 2.2 keyframe
    workflow that uses the video workflow's own model files."""
    import workflows

    cfg = settings.comfyui
    if cfg.keyframe_binding or cfg.keyframe_workflow:
        return workflows.binding_path(cfg.keyframe_binding or cfg.keyframe_workflow or "")
    name = "wan22_ti2v_5b_keyframe" if video.binding.model == "wan2.2-5b" \
        else "wan22_14b_t2v_keyframe"
    return workflows.binding_path(name)


def load_keyframe_workflow(path: Path) -> BoundWorkflow:
    bound = BoundWorkflow.load(path)
    problems = bound.keyframe_problems()
    if problems:
        raise WorkflowError(f"keyframe workflow {path}: " + "; ".join(problems))
    return bound


@dataclass
class ShotRun:
    """Everything ComfyUI did for one shot: its prompts, in order, and the files it left."""

    shot: Shot
    executions: list[tuple[str, Execution]] = field(default_factory=list)  # (stage, ex)
    files: list[tuple[str, str]] = field(default_factory=list)  # (kind, relative path)

    @property
    def seconds(self) -> float:
        return sum(ex.seconds for _, ex in self.executions)

    @property
    def cached(self) -> bool:
        """Cached only when every stage was answered wholly from ComfyUI's cache."""
        return bool(self.executions) and all(ex.fully_cached for _, ex in self.executions)

    def details(self) -> dict[str, Any]:
        last = self.executions[-1][1]
        return {"prompt_ids": {stage: ex.prompt_id for stage, ex in self.executions},
                "prompt_id": last.prompt_id,
                "reconnects": sum(ex.reconnects for _, ex in self.executions),
                "node_seconds": {nid: round(s, 3) for _, ex in self.executions
                                 for nid, s in ex.node_seconds.items()},
                "cached_nodes": sorted({n for _, ex in self.executions
                                        for n in ex.cached_nodes}),
                "stage_seconds": {stage: round(ex.seconds, 2)
                                  for stage, ex in self.executions}}


class ComfyUIEngine:
    name = "comfyui"
    is_preview = False

    def __init__(self, client: ComfyUIClient, bound: BoundWorkflow, server: ComfyUIServer, *,
                 stall_timeout_s: float = 600.0, shot_timeout_s: float = 3600.0,
                 max_restarts_per_shot: int = 1, force_fresh: bool = False,
                 decode: str = "auto", keyframe: BoundWorkflow | None = None) -> None:
        if bound.binding.output == "image":
            raise WorkflowError(f"{bound.source} is a keyframe (image) workflow; give a video "
                                "workflow as comfyui.workflow and this one as "
                                "comfyui.keyframe_workflow or keyframe_binding")
        self.client, self.bound, self.server = client, bound, server
        self.keyframe = keyframe  # the text-to-image workflow for keyframes, if any
        self.stall_timeout_s, self.shot_timeout_s = stall_timeout_s, shot_timeout_s
        self.max_restarts_per_shot = max_restarts_per_shot
        self.force_fresh = force_fresh
        self.decode = decode  # "auto" (the broker decides), "full" or "tiled"
        self._started = False
        self.extra_inputs: dict[str, Any] = {}
        self.broker: Broker | None = None
        self.timeline: Timeline | None = None
        self.info: ServerInfo | None = None
        self._leftover_files = 0

    @staticmethod
    def from_settings(settings: Settings, log_dir: Path | None = None) -> ComfyUIEngine:
        import workflows

        cfg = settings.comfyui
        bound = BoundWorkflow.load(workflows.binding_path(cfg.binding or cfg.workflow))
        server: ComfyUIServer
        if cfg.command:
            server = ComfyUIProcess(cfg.command + headroom_args(settings), url=cfg.url,
                                    cwd=cfg.cwd,
                                    log_path=(log_dir / "comfyui.log") if log_dir else None,
                                    start_timeout_s=cfg.start_timeout_s)
        else:
            server = AttachedComfyUI(cfg.url)
        keyframe = None
        if settings.video.start_images in ("keyframe", "keyframe+chain") \
                and "start_image" in bound.binding.inputs:  # text to video uses none
            keyframe = load_keyframe_workflow(keyframe_binding(settings, bound))
        return ComfyUIEngine(ComfyUIClient(cfg.url), bound, server,
                             stall_timeout_s=cfg.stall_timeout_s,
                             shot_timeout_s=cfg.shot_timeout_s, force_fresh=cfg.force_fresh,
                             decode=cfg.decode, keyframe=keyframe)

    def fingerprint(self) -> str:
        # Stable across processes (resume keys): no hash(), which Python salts per process.
        extra = json.dumps(self.extra_inputs, sort_keys=True, default=str).encode()
        return f"comfyui-{self.bound.fingerprint()}-{hashlib.sha256(extra).hexdigest()[:8]}"

    # -- start and checks ------------------------------------------------------------------
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
            self.info = ServerInfo.from_system_stats(self.client.system_stats())
            log.info("%s", self.info.describe())
            self._sweep_leftovers()

    def server_info(self) -> ServerInfo:
        self._ensure_started()
        assert self.info is not None
        return self.info

    def check(self) -> EngineStatus:
        try:
            self._start_server()
            stats = self.client.system_stats()
            classes = self.client.object_info()
            problems = self.bound.online_problems(classes)
            if self.keyframe is not None:  # keyframes are wanted: their workflow too
                problems += [f"keyframe workflow {Path(self.keyframe.source).name}: {p}"
                             for p in self.keyframe.online_problems(classes)]
        except ComfyUIError as err:
            return EngineStatus(False, str(err))
        if problems:
            return EngineStatus(False, "; ".join(problems))
        info = ServerInfo.from_system_stats(stats)
        return EngineStatus(True, f"{info.describe()} at {self.client.url}, workflow "
                                  f"{Path(self.bound.source).name} checks out")

    def preflight(self) -> None:
        """Refuse before any GPU time when a class, input or model file is missing."""
        status = self.check()
        if not status.ok:
            raise WorkflowError(status.detail)

    @property
    def takes_start_image(self) -> bool:
        return "start_image" in self.bound.binding.inputs

    def check_shots(self, shots: list[Shot]) -> None:
        """Refuse a plan this workflow cannot render, before any work: an image-to-video
        workflow needs a start image for every shot (the files are checked where they
        are made: story_to_video.start_images)."""
        if not self.takes_start_image or self.bound.binding.start_image_optional:
            return
        missing = [s.id for s in shots if not s.start_image]
        if missing:
            raise WorkflowError(
                f"workflow {Path(self.bound.source).name} starts every clip from an image, but "
                f"shot{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'have' if len(missing) > 1 else 'has'} no start image: set "
                "video.start_images (or give start_image per shot), or use a text-to-video "
                "workflow such as wan22_14b_t2v")

    # -- one shot ----------------------------------------------------------------------------
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
        self.check_shots([shot])
        t_start = self._now()
        if self.force_fresh:
            # resets ComfyUI's cache; 0.33 unloads the models too (free_memory implies it)
            self.client.free(unload_models=False, free_memory=True)
        plan = self.broker.plan(shot.frames, shot.width, shot.height, shot.id) \
            if self.broker else None
        prompt = self._prompt(shot, plan)
        run = ShotRun(shot)
        try:
            if plan is not None and self._staged(plan, shot.id):
                self._render_staged(run, prompt, plan, progress)
            else:
                prompt = self._apply_planned_decode(prompt, plan, shot)
                run.executions.append(("all", self._run_with_restarts(shot, prompt, progress)))
            ex = run.executions[-1][1]
            self._download(output_file(ex.outputs, self.bound.binding.nodes.output), out_path)
            self._check_clip(shot, out_path)
        finally:
            self._remove_files(run)
        return self._result(run, out_path, plan, t_start)

    def _result(self, run: ShotRun, out_path: Path, plan: BrokerPlan | None,
                t_start: float) -> ClipResult:
        shot = run.shot
        if run.cached:
            log.warning("%s: ComfyUI answered every stage from its cache (no node ran); "
                        "reported as cached, not as a generation", shot.id)
        details = run.details()
        if plan is not None and self.broker is not None:
            details["vram"] = self._vram_record(plan, shot.id, t_start)
        return ClipResult(path=out_path, frames=shot.frames, fps=shot.fps, width=shot.width,
                          height=shot.height, seconds=self._now() - t_start,
                          engine=self.name, preview=False, cached=run.cached, details=details)

    def _prompt(self, shot: Shot, plan: BrokerPlan | None) -> dict[str, Any]:
        """The shot's workflow: bound values, start image uploaded, broker choices applied."""
        prompt = self.bound.bind(shot, **self.extra_inputs)
        targets = self.bound.binding.inputs.get("start_image", [])
        if shot.start_image and targets:
            name = self._upload_input(Path(shot.start_image), "start")
            for node, inp in targets:
                prompt[node]["inputs"][inp] = name
        elif targets and self.bound.binding.start_image_optional:
            prompt = cut_optional_input(prompt, [node for node, _ in targets])
        if plan is not None:
            self._apply_block_swap(prompt, plan, shot.id)
            prompt = self._apply_text_encoder(prompt, plan, shot.id)
        return prompt

    def _upload_input(self, path: Path, kind: str) -> str:
        """Upload under a name made from the content: two shots whose images share a file
        name never overwrite each other, and the same image keeps ComfyUI's cache valid."""
        data = path.read_bytes()
        name = f"stv_{kind}_{hashlib.sha256(data).hexdigest()[:16]}{path.suffix.lower()}"
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / name
            tmp.write_bytes(data)
            return self.client.upload_image(tmp, subfolder="story-to-video")

    # -- keyframes ------------------------------------------------------------------------------
    def keyframe_fingerprint(self) -> str:
        if self.keyframe is None:
            raise WorkflowError("no keyframe workflow: set video.start_images to keyframe or "
                                "keyframe+chain")
        return f"comfyui-keyframe-{self.keyframe.fingerprint()}"

    def keyframe_models(self) -> tuple[set[str], set[str]]:
        """Model files of the keyframe and the video workflow: shared files load once."""
        def files(bw: BoundWorkflow | None) -> set[str]:
            return {str(v) for n in (bw.workflow.values() if bw else []) for v in
                    n["inputs"].values() if isinstance(v, str) and v.endswith(
                        (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin"))}
        return files(self.keyframe), files(self.bound)

    def render_keyframe(self, shot: Shot, prompt: str, out_path: Path) -> dict[str, Any]:
        """One still at the shot's size from the keyframe workflow (length 1 for Wan)."""
        assert self.keyframe is not None
        self._ensure_started()
        wf = self.keyframe.bind(shot, prompt=prompt, frames=1,
                                filename_prefix=f"story-to-video/{shot.id}-keyframe")
        self._mark(f"{shot.id} keyframe")
        ex = self._run_with_restarts(shot, wf, None)
        self._download(output_image(ex.outputs, self.keyframe.binding.nodes.output), out_path)
        return {"prompt_id": ex.prompt_id, "seconds": round(ex.seconds, 2),
                "cached": ex.fully_cached, "workflow": Path(self.keyframe.source).name}

    def after_keyframes(self, unload: bool) -> None:
        """Between the keyframe stage and the clips: the broker's unload, if it chose one."""
        if unload:
            self.client.free(unload_models=True)
            self._mark("unload keyframe model")

    @staticmethod
    def _check_clip(shot: Shot, out_path: Path) -> None:
        got = probe(out_path)
        if got.frames != shot.frames or (got.width, got.height) != (shot.width, shot.height):
            bad = out_path.with_suffix(".unexpected.mp4")
            out_path.replace(bad)  # kept for inspection, never taken as the shot's clip
            raise ComfyUIError(f"{shot.id}: ComfyUI returned {got.frames} frames at "
                               f"{got.width}x{got.height}, expected {shot.frames} at "
                               f"{shot.width}x{shot.height} (kept as {bad.name})")

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _download(self, item: dict[str, Any], out_path: Path) -> None:
        with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
            for chunk in self.client.view(item["filename"], item.get("subfolder", ""),
                                          item.get("type", "output")):
                fh.write(chunk)

    # -- broker choices applied to the graph ------------------------------------------------
    def _event(self, stage: str, action: str, predicted: float, reason: str, outcome: str,
               shot_id: str, params: dict[str, Any] | None = None) -> None:
        assert self.broker is not None
        from resource_broker.broker import BrokerEvent

        self.broker.record(BrokerEvent(stage, action, predicted, self.broker.free_gib(),
                                       reason, outcome, shot_id, params or {}))

    def _apply_block_swap(self, prompt: dict[str, Any], plan: BrokerPlan, shot_id: str) -> None:
        """Set the block count the broker chose on the workflow's block-swap node, if any."""
        d = plan.decision("experts")
        if d.action != "block-swap" or self.broker is None:
            return
        n = int(d.params["blocks_to_swap"])
        targets = self.bound.binding.inputs.get("blocks_to_swap", [])
        for node, inp in targets:
            prompt[node]["inputs"][inp] = n
        outcome = (f"set blocks_to_swap={n} on node(s) {', '.join(t[0] for t in targets)}"
                   if targets else "the workflow has no block-swap node bound: relying on "
                   "ComfyUI's own offload")
        self._event("experts", "block-swap", d.predicted_gib, d.reason, outcome, shot_id,
                    d.params)

    def _apply_text_encoder(self, prompt: dict[str, Any], plan: BrokerPlan,
                            shot_id: str) -> dict[str, Any]:
        d = plan.decision("encode")
        if d.action != "text-encoder-on-cpu" or self.broker is None:
            return prompt
        out, nodes = place_text_encoder(prompt, "cpu")
        outcome = (f"CLIPLoader device=cpu on node(s) {', '.join(nodes)}" if nodes else
                   "no CLIPLoader in the workflow: not applied")
        self._event("encode", d.action, d.predicted_gib, d.reason, outcome, shot_id)
        return out

    @staticmethod
    def forced_tiles(shot: Shot) -> dict[str, int]:
        """comfyui.decode = "tiled": tiles of about half the frame (at least 64 px, at most
        512), so the decode really runs tile by tile."""
        tile = max(64, min(512, (min(shot.width, shot.height) // 2) // 32 * 32))
        return {"tile_size": tile, "overlap": tile // 4, "temporal_size": 8,
                "temporal_overlap": 4}

    def _apply_planned_decode(self, prompt: dict[str, Any], plan: BrokerPlan | None,
                              shot: Shot) -> dict[str, Any]:
        decode, shot_id = self.bound.binding.nodes.decode, shot.id
        if self.decode == "tiled":
            return use_tiled_decode(prompt, decode, **self.forced_tiles(shot))
        if self.decode == "full" or plan is None:
            return prompt
        d = plan.decision("decode")
        self._event("decode", d.action, d.predicted_gib, d.reason,
                    "applied to the single-prompt graph", shot_id, d.params)
        if "tiled" in d.action:
            return use_tiled_decode(prompt, decode, **{k: int(d.params[k]) for k in (
                "tile_size", "overlap", "temporal_size", "temporal_overlap")})
        return prompt

    def _decode_choice(self, wf: dict[str, Any], plan: BrokerPlan, shot: Shot
                       ) -> dict[str, Any]:
        """Right before a separate decode prompt: headroom checked now, full or tiled."""
        decode = self.bound.binding.nodes.decode
        if self.decode == "tiled":
            return use_tiled_decode(wf, decode, **self.forced_tiles(shot))
        if self.decode == "full" or self.broker is None:
            return wf
        choice = self.broker.decode_headroom(
            plan, shot.id, lambda: self.client.free(unload_models=True))
        return use_tiled_decode(wf, decode, **choice.params) if choice.tiled else wf

    # -- staged and pass-major rendering ------------------------------------------------------
    def _stages_share_encoder(self, consecutive: bool, shots: int = 1) -> tuple[bool, str]:
        """Will the later stages find the text encoder's output in ComfyUI's cache? With
        RAM-pressure caching (0.33's default) yes; with --cache-classic only from the prompt
        just before; with --cache-lru N when N holds the shots' nodes; --cache-none never."""
        info = self.info
        if info is None:
            return True, "server not read yet"
        mode = info.cache_mode
        if mode == "classic":
            return consecutive, ("classic cache keeps only the previous prompt's outputs"
                                 + ("" if consecutive else ": a later pass of an earlier shot "
                                    "would encode its prompt again"))
        if mode == "lru":
            need = 20 * shots  # node results of one shot's prompts, generously
            return info.cache_lru_size >= need, (f"--cache-lru {info.cache_lru_size} vs "
                                                 f"about {need} node results to keep")
        if mode == "none":
            return False, "--cache-none: every prompt runs every node again"
        return True, "RAM-pressure cache keeps the encoder's output"

    def _staged(self, plan: BrokerPlan, shot_id: str) -> bool:
        action = plan.decision("experts").action
        if not (self.bound.binding.two_expert and action in ("unload-high-before-low",
                                                             "block-swap")):
            return False
        ok, why = self._stages_share_encoder(consecutive=True)
        if not ok:
            self._event("experts", "one-prompt", plan.peak_gib,
                        f"a split would re-run the text encoder ({why})",
                        "shot rendered as one prompt; ComfyUI manages the experts", shot_id)
        return ok

    def _stages(self, shot: Shot, prompt: dict[str, Any]) -> list[Stage]:
        nodes = self.bound.binding.nodes
        assert nodes.high_sampler and nodes.low_sampler
        return split_stages(prompt, high_sampler=nodes.high_sampler,
                            low_sampler=nodes.low_sampler, decode=nodes.decode,
                            output=nodes.output, prefix=f"{LATENT_SUBFOLDER}/{shot.id}")

    def _run_stage(self, run: ShotRun, stage: Stage, latent: str | None,
                   progress: ProgressCallback | None, plan: BrokerPlan | None
                   ) -> str | None:
        """One stage's prompt; returns the latent handed to the next stage, if any."""
        wf = dict(stage.workflow)
        if stage.latent_in is not None:
            assert latent is not None
            wf[stage.latent_in] = {**wf[stage.latent_in], "inputs": {"latent": latent}}
        if stage.name == "decode" and plan is not None:
            wf = self._decode_choice(wf, plan, run.shot)
        self._mark(f"{run.shot.id} {stage.name}")
        ex = self._run_with_restarts(run.shot, wf, progress)
        run.executions.append((stage.name, ex))
        return self._hand_over_latent(ex, stage, run) if stage.latent_out else None

    def _render_staged(self, run: ShotRun, prompt: dict[str, Any], plan: BrokerPlan,
                       progress: ProgressCallback | None) -> None:
        """Pass 1 -> latent, unload the high-noise expert, pass 2 -> latent, check decode
        headroom, decode. Latents travel as files: /view from output, /upload to input."""
        latent: str | None = None
        for stage in self._stages(run.shot, prompt):
            if stage.name == "low":
                self.client.free(unload_models=True)  # the high-noise expert goes
                self._mark(f"{run.shot.id} unload high")
            latent = self._run_stage(run, stage, latent, progress, plan)

    def pass_major_refusal(self, shots: int) -> str | None:
        """Why pass-major batching would cost more than it saves here (None: it is fine)."""
        nodes = self.bound.binding.nodes
        if not (self.bound.binding.two_expert and nodes.high_sampler and nodes.low_sampler):
            return "pass-major batching needs a two-expert workflow"
        self._ensure_started()
        ok, why = self._stages_share_encoder(consecutive=False, shots=shots)
        return None if ok else f"the low-noise passes would re-run the text encoder ({why})"

    def render_pass_major(self, shots: list[Shot], out_paths: list[Path],
                          progress: ProgressCallback | None = None) -> list[ClipResult]:
        """A batch of two-expert shots, pass by pass: every high-noise pass, then every
        low-noise pass, then every decode, so each expert is loaded once per batch instead
        of once per clip. Each shot's record has its own prompts, seconds and checks."""
        self._ensure_started()
        refusal = self.pass_major_refusal(len(shots))
        if refusal:
            raise WorkflowError(refusal)
        self.check_shots(shots)
        # Keyed by position: shots of several ideas share ids (s01_sh01 in every plan).
        plans = [self.broker.plan(s.frames, s.width, s.height, s.id) if self.broker else None
                 for s in shots]
        runs = [ShotRun(s) for s in shots]
        staged = [self._stages(s, self._prompt(s, p)) for s, p in zip(shots, plans, strict=True)]
        latents: list[str | None] = [None] * len(shots)
        started = self._now()
        try:
            for i, phase in enumerate(("high", "low", "decode")):
                if i:
                    self.client.free(unload_models=True)  # the previous pass's expert goes
                self._mark(f"pass-major {phase}")
                for n in range(len(shots)):
                    latents[n] = self._run_stage(runs[n], staged[n][i], latents[n], progress,
                                                 plans[n])
            return [self._pass_major_result(run, out, plan, started)
                    for run, out, plan in zip(runs, out_paths, plans, strict=True)]
        finally:
            for run in runs:
                self._remove_files(run)

    def _pass_major_result(self, run: ShotRun, out: Path, plan: BrokerPlan | None,
                           started: float) -> ClipResult:
        ex = run.executions[-1][1]
        self._download(output_file(ex.outputs, self.bound.binding.nodes.output), out)
        self._check_clip(run.shot, out)
        result = self._result(run, out, plan, started)
        result.seconds = run.seconds  # its own prompts, not the whole batch's
        result.details["pass_major"] = True
        return result

    def can_pass_major(self) -> bool:
        return self.bound.binding.two_expert

    def _hand_over_latent(self, ex: Execution, stage: Stage, run: ShotRun) -> str:
        out = ex.outputs.get(stage.latent_out or "") or {}
        items = out.get("latents") or []
        if not items:
            raise ComfyUIError(f"{run.shot.id}: stage {stage.name} saved no latent ({out})")
        item = items[0]
        run.files.append(("output", f"{item.get('subfolder', '')}/{item['filename']}"))
        data = b"".join(self.client.view(item["filename"], item.get("subfolder", ""),
                                         item.get("type", "output")))
        # Named by content: an identical re-run finds the same name, so ComfyUI's cache
        # still answers the next stage.
        name = f"stv_{run.shot.id}_{stage.name}_{hashlib.sha256(data).hexdigest()[:12]}.latent"
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / name
            tmp.write_bytes(data)
            try:
                uploaded = self.client.upload_image(tmp, subfolder="")
            except ComfyUIUnavailable as err:
                raise ComfyUIDied(f"{run.shot.id}: ComfyUI went away while the {stage.name} "
                                  f"latent was uploaded: {err}") from err
        run.files.append(("input", uploaded))
        return uploaded

    # -- ComfyUI's folders ---------------------------------------------------------------------
    def _folders(self) -> dict[str, Path]:
        """ComfyUI's input and output folders, where this machine can see them."""
        found: dict[str, Path] = {}
        candidates = list(self.info.folders()) if self.info else []
        cwd = getattr(self.server, "cwd", None)
        if cwd:
            candidates += [Path(cwd) / "input", Path(cwd) / "output"]
        for p in candidates:
            if p.name in ("input", "output") and p.is_dir():
                found.setdefault(p.name, p)
        return found

    def _remove_files(self, run: ShotRun) -> None:
        """Staged latents are scratch: remove them from ComfyUI's folders after the shot."""
        if not run.files:
            return
        folders = self._folders()
        for kind, rel in run.files:
            folder = folders.get(kind)
            path = (folder / rel.lstrip("/")).resolve() if folder else None
            if path is not None and folder is not None and folder.resolve() in path.parents \
                    and path.is_file():
                path.unlink()
                continue
            self._leftover_files += 1
        if self._leftover_files:
            log.warning("%s: %d handed-over latent file(s) stay in ComfyUI's %s folders "
                        "(not visible from here); they are named stv_* and %s/*", run.shot.id,
                        self._leftover_files, "/".join(sorted({k for k, _ in run.files})),
                        LATENT_SUBFOLDER)
            self._leftover_files = 0

    def _sweep_leftovers(self) -> None:
        """Latents left by a crashed run (older than LEFTOVER_AGE_S) are removed at start."""
        folders = self._folders()
        now = time.time()
        patterns = {"input": ["stv_*.latent"], "output": [f"{LATENT_SUBFOLDER}/*.latent"]}
        gone = 0
        for kind, folder in folders.items():
            for pattern in patterns[kind]:
                for p in folder.glob(pattern):
                    if now - p.stat().st_mtime > LEFTOVER_AGE_S:
                        p.unlink(missing_ok=True)
                        gone += 1
        if gone:
            log.info("removed %d latent file(s) left in ComfyUI's folders by earlier runs", gone)

    # -- broker bookkeeping -----------------------------------------------------------------
    def _mark(self, label: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(label)

    def _vram_record(self, plan: BrokerPlan, shot_id: str, t_start: float) -> dict[str, Any]:
        assert self.broker is not None
        rec: dict[str, Any] = {"predicted_peak_gib": plan.peak_gib,
                               "plan": plan.to_json(),
                               "actions": [e.to_json() for e in self.broker.events
                                           if e.shot_id == shot_id]}
        tl = self.timeline
        # a shot shorter than the sampling interval has no reading: not measured, never 0.00
        if tl is not None and tl.window(t_start - tl.t0, float("inf")):
            rec["measured_peak_gib"] = round(tl.peak_used_gib(t_start - tl.t0), 2)
            rec["min_free_gib"] = round(tl.min_free_gib(t_start - tl.t0), 2)
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

    def _run_with_restarts(self, shot: Shot, prompt: dict[str, Any],
                           progress: ProgressCallback | None) -> Execution:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "progress" and progress is not None:
                progress(Progress(shot.id, int(data.get("value", 0)), int(data.get("max", 0)),
                                  str(data.get("node") or "")))

        attempt = 0
        if self.server.supervised and not self.server.alive():
            log.warning("%s: the ComfyUI process is gone; starting it again", shot.id)
            self.server.restart("the process exited")
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
