"""Time model: how long each stage of a night takes, for the ETA and the `--until` window.

Defaults come from measurements (shared/ANCHORS.md and real ComfyUI on an H100):
- sampling, Wan 2.2 A14B in ComfyUI 0.33, one step at cfg 1: 2.02 s at 81 frames 832x480
  (32,760 latent tokens, 32 GiB free), 6.7-7.2 s at 161 frames (63,960 tokens); attention
  makes it quadratic, so a step is a*n + b*n^2 seconds for n tokens, fitted through those
  two points; with only 14 GiB free (ComfyUI offloading weights) 3.32 s instead of 2.02 s;
- VAE full decode: 2.31 s at 81 f 832x480, 4.84 s at 81 f 1280x720 (a line through both),
  tiled about 2.2x slower (5.57 s and 9.99 s);
- loads from disk: a 14B fp8 expert is 13.57 GiB, umt5 fp8 about 5.8 GiB; NVMe at 2.5 GiB/s
  (an assumption until this machine measured it: "several seconds" per expert).
Everything else (LLM load and speed, per-prompt overhead, preview and assembly speed) is an
estimate that the first real night replaces: after every measured stage `refine` nudges a
per-stage scale toward measured/predicted, and the model is saved beside the broker's VRAM
calibration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .cost_model import GIB, MODELS, tokens

# Compute per step relative to the 14B expert: parameter count ratio (not measured).
MODEL_COMPUTE = {"wan2.2-14b": 1.0, "wan2.2-14b-bf16": 1.0, "wan2.1-14b": 1.0,
                 "wan2.2-5b": 5.0 / 14.29, "wan2.1-1.3b": 1.3 / 14.29}
STAGES = ("sample", "decode", "encode", "overhead", "load", "render", "llm_load", "plan",
          "preview", "assemble", "keyframes")


@dataclass(frozen=True)
class EngineProfile:
    """What the time model needs to know about the engine that renders a shot."""

    kind: str  # "preview" or "comfyui"
    model: str = "wan2.2-14b"
    steps: tuple[int, ...] = (2, 2)  # sampling steps per expert pass (high, low) or (all,)
    forwards_per_step: int = 1  # 2 with CFG > 1
    offload: bool = False  # weights offloaded (block swap): slower steps
    # ComfyUI's dynamic VRAM (0.33's default) keeps the experts between one-prompt shots:
    # pass by pass saves nothing there (1.04x to 1.07x slower: policy.MEASURED).
    dynamic_vram: bool = False

    @property
    def gpu(self) -> bool:
        return self.kind != "preview"

    @property
    def experts(self) -> int:
        return len(self.steps)


@dataclass
class TimeModel:
    step_s_per_token: float = 1.232e-5
    step_s_per_token2: float = 1.506e-9
    offload_slowdown: float = 3.32 / 2.02
    decode_base_s: float = 0.38
    decode_s_per_pixel_frame: float = 5.98e-8
    tiled_decode_factor: float = 2.2
    encode_s: float = 0.5
    prompt_overhead_s: float = 1.0  # queue, progress socket, saving the clip, per prompt
    disk_gib_per_s: float = 2.5
    llm_load_s: float = 20.0
    llm_tokens_per_s: float = 40.0
    plan_tokens: float = 1500.0  # story + bible + scenes, repairs included, per idea
    preview_s_per_frame: float = 0.02
    assemble_base_s: float = 1.0
    assemble_s_per_frame: float = 0.01
    scale: dict[str, float] = field(default_factory=dict)  # measured / predicted per stage
    samples: dict[str, int] = field(default_factory=dict)

    def _k(self, stage: str) -> float:
        return self.scale.get(stage, 1.0)

    # -- GPU stages of one shot --------------------------------------------------------------
    def step_terms(self, model: str, frames: int, width: int, height: int
                   ) -> tuple[float, float]:
        """A sampling step's seconds that grow with the latent tokens and with their square
        (the attention); benchmarks/calibrate_time.py scales the two apart."""
        n = tokens(MODELS[model], frames, width, height)
        k = MODEL_COMPUTE.get(model, 1.0) * self._k("sample")
        return self.step_s_per_token * n * k, self.step_s_per_token2 * n * n * k

    def step_seconds(self, model: str, frames: int, width: int, height: int) -> float:
        return sum(self.step_terms(model, frames, width, height))

    def shot_seconds(self, p: EngineProfile, frames: int, width: int, height: int,
                     *, tiled: bool = False) -> dict[str, float]:
        """Seconds of one shot's stages, models already loaded."""
        if not p.gpu:
            return {"preview": self.preview_s_per_frame * frames * self._k("preview")}
        step = self.step_seconds(p.model, frames, width, height)
        sample = sum(p.steps) * p.forwards_per_step * step
        if p.offload:
            sample *= self.offload_slowdown
        decode = (self.decode_base_s + self.decode_s_per_pixel_frame * frames * width
                  * height) * (self.tiled_decode_factor if tiled else 1.0)
        return {"encode": self.encode_s * self._k("encode"), "sample": sample,
                "decode": decode * self._k("decode"),
                # a two-expert shot is three prompts when run stage by stage
                "overhead": self.prompt_overhead_s * (p.experts + 1) * self._k("overhead")}

    def load_seconds(self, p: EngineProfile) -> float:
        """One set of model loads from disk: text encoder, the experts, the VAE."""
        if not p.gpu:
            return 0.0
        spec = MODELS[p.model]
        nbytes = spec.text_encoder_bytes + p.experts * spec.expert_bytes + spec.vae_weight_bytes
        return nbytes / GIB / self.disk_gib_per_s * self._k("load")

    def group_seconds(self, p: EngineProfile, shots: list[tuple[int, int, int]]
                      ) -> dict[str, float]:
        """A group of shots rendered together: one set of loads, then every shot's stages."""
        out: dict[str, float] = {"load": self.load_seconds(p)} if p.gpu else {}
        for frames, width, height in shots:
            for k, v in self.shot_seconds(p, frames, width, height).items():
                out[k] = out.get(k, 0.0) + v
        # "render": what measured GPU groups taught this machine, on top of the parts
        learned = self._k("render") if p.gpu else 1.0
        return {name: v * learned for name, v in out.items()}

    def keyframe_seconds(self, p: EngineProfile, shapes: list[tuple[int, int, int]]) -> float:
        """Keyframes made in a row: as a group of one-frame shots of the video model (the
        shipped keyframe workflows are the Wan 2.2 models at length 1); what the night
        measures corrects it (stage "keyframes")."""
        if not shapes:
            return 0.0
        return sum(self.group_seconds(p, shapes).values()) * self._k("keyframes")

    def pass_major_pays(self, p: EngineProfile, n_shots: int) -> bool:
        """Pass by pass saves a set of loads per shot after the first; it costs the latent
        hand-over: two more prompts per shot than a single-prompt render."""
        if not p.gpu or p.experts < 2 or n_shots < 2 or p.dynamic_vram:
            return False
        saved = (n_shots - 1) * self.load_seconds(p)
        cost = n_shots * 2 * self.prompt_overhead_s * self._k("overhead")
        return saved > cost

    # -- LLM and assembly --------------------------------------------------------------------
    def llm_load_seconds(self) -> float:
        return self.llm_load_s * self._k("llm_load")

    def plan_seconds(self) -> float:
        return self.plan_tokens / self.llm_tokens_per_s * self._k("plan")

    def assemble_seconds(self, frames: int) -> float:
        return (self.assemble_base_s + self.assemble_s_per_frame * frames) * self._k("assemble")

    # -- learning ----------------------------------------------------------------------------
    def refine(self, stage: str, predicted: float, measured: float,
               weight: float = 0.5) -> None:
        """Nudge the stage's scale toward measured/predicted (predicted with the old scale)."""
        if stage not in STAGES or predicted <= 0 or measured <= 0:
            return
        ratio = min(100.0, max(0.01, measured / predicted))
        self.scale[stage] = self._k(stage) * ratio ** weight
        self.samples[stage] = self.samples.get(stage, 0) + 1

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> TimeModel:
        """The saved model of this machine, or the defaults; unknown keys are ignored."""
        if not path.is_file():
            return TimeModel()
        try:
            raw = json.loads(path.read_text())
        except ValueError:
            return TimeModel()
        known = {f.name for f in fields(TimeModel)}
        return TimeModel(**{k: v for k, v in raw.items() if k in known})
