"""The broker's decisions for one shot, made from the cost model and a VRAM budget.

Pure: numbers in, decisions out. Every decision carries the numbers behind it, so the
dry run (`story-to-video broker plan`), the logs and the run report all explain the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .cost_model import GIB, CostModel, ShotCost

# ComfyUI VAEDecodeTiled settings, largest first: (tile, overlap, temporal, temporal overlap)
TILE_CHOICES = [(512, 64, 64, 8), (384, 48, 64, 8), (256, 32, 64, 8), (256, 32, 32, 4),
                (192, 32, 32, 4), (128, 16, 16, 4)]


class BudgetTooSmall(ValueError):
    """No plan fits the budget; the message gives the numbers."""


class PlanInputError(ValueError):
    """A number given to the planner is impossible (negative, not finite, zero budget)."""


def check_inputs(frames: int, width: int, height: int, *, budget_gib: float,
                 margin_gib: float, llm_gib: float) -> None:
    """The same bounds the settings enforce (broker.budget_gib > 0, safety_margin_gib >= 0,
    llm_gib >= 0), so a dry run never prints a plan that cannot be."""
    for name, value in (("frames", frames), ("width", width), ("height", height)):
        if value <= 0:
            raise PlanInputError(f"{name} must be greater than 0, got {value}")
    gib_values: tuple[tuple[str, float, float | None], ...] = (
        ("budget_gib", budget_gib, None), ("margin_gib", margin_gib, 0.0),
        ("llm_gib", llm_gib, 0.0))
    for name, gib_value, low in gib_values:
        if not math.isfinite(gib_value):
            raise PlanInputError(f"{name} must be a finite number, got {gib_value}")
        if low is None and gib_value <= 0:
            raise PlanInputError(f"{name} must be greater than 0, got {gib_value:g}")
        if low is not None and gib_value < low:
            raise PlanInputError(f"{name} must be at least {low:g}, got {gib_value:g}")


def gib(n: float) -> float:
    return round(n / GIB, 2)


@dataclass(frozen=True)
class Decision:
    stage: str  # "llm", "encode", "experts", "decode"
    action: str
    predicted_gib: float  # what the stage needs on the GPU, by the cost model
    available_gib: float  # what the budget leaves for it
    reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BrokerPlan:
    model: str
    frames: int
    width: int
    height: int
    budget_gib: float
    margin_gib: float
    llm_gib: float
    cost: dict[str, float]
    decisions: list[Decision]
    stage_peaks_gib: dict[str, float]

    @property
    def peak_gib(self) -> float:
        return max(self.stage_peaks_gib.values())

    def decision(self, stage: str) -> Decision:
        return next(d for d in self.decisions if d.stage == stage)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gib"] = self.peak_gib
        return d


MEMORY_MODES = ("estimate", "dynamic", "cpu")
STRATEGIES = ("auto", "one-prompt", "staged", "broker")

# Seconds per clip against the best strategy of the row, measured on an H100 with real
# ComfyUI 0.33 (benchmarks/comfyui_gpu.py, 832x480, 4 steps, 3-shot batches; JSON in
# benchmarks/results/). Every reason the broker gives quotes this one table.
MEASURED: dict[str, dict[str, float]] = {
    "dynamic, 32 GiB free": {"one-prompt": 1.00, "pass-major": 1.04, "staged": 1.52},
    "dynamic, 14 GiB free": {"one-prompt": 1.00, "pass-major": 1.07},
    "dynamic, 20 GiB free, 161 frames": {"one-prompt": 1.00, "pass-major": 1.05},
    "dynamic, 20 GiB free, 1280x720x81": {"one-prompt": 1.00, "pass-major": 1.03},
    # 163.69, 163.31 and 170.94 s a clip: long passes change nothing
    "dynamic, 32 GiB free, 20+20 steps": {"one-prompt": 1.00, "pass-major": 1.00,
                                          "staged": 1.05},
    "classic, 32 GiB free": {"pass-major": 1.00, "one-prompt": 1.32, "staged": 1.47},
    "classic, 14 GiB free": {"pass-major": 1.00, "one-prompt": 1.06, "staged": 1.54},
}
# So a shot is one prompt and ComfyUI places the experts; batches go pass by pass on the
# classic loader only, when both experts do not fit (pass_major_case).


def measured(row: str, strategy: str, than: str) -> str:
    """'1.52x' style: how much slower `strategy` was than `than` on a measured row."""
    r = MEASURED[row]
    return f"{r[strategy] / r[than]:.2f}x"


def all_experts_peak(c: ShotCost, experts: int) -> int:
    """Bytes of a sampling stage with every expert resident: weights, activations, context."""
    return experts * c.expert + c.activations + c.context


def pass_major_case(cost: ShotCost, experts: int, *, memory_mode: str, strategy: str,
                    shots: int, budget_gib: float, margin_gib: float) -> tuple[bool, str]:
    """Batch the shots pass by pass? Measured to win only on ComfyUI's classic loader when
    both experts do not fit together (each shot would reload both). Returns the answer and
    the measured case behind it, with the numbers."""
    both = all_experts_peak(cost, experts)
    if memory_mode == "cpu":
        return False, "ComfyUI on the CPU: no VRAM to manage, the broker only logs"
    if strategy != "auto":
        return False, (f"strategy {strategy} forced by the setting; auto would follow the "
                       "measurements")
    if memory_mode == "dynamic":
        return False, ("dynamic VRAM: one prompt per shot, ComfyUI keeps the experts between "
                       "shots and sizes the decode (measured: staged "
                       f"{measured('dynamic, 32 GiB free', 'staged', 'one-prompt')}, "
                       "pass-major "
                       f"{measured('dynamic, 32 GiB free', 'pass-major', 'one-prompt')} to "
                       f"{measured('dynamic, 14 GiB free', 'pass-major', 'one-prompt')} "
                       "slower); the broker's work is the LLM beside it")
    if experts == 2 and shots >= 2 and both + margin_gib * GIB > budget_gib * GIB:
        return True, (f"classic loader, both experts + activations need {both / GIB:.2f} GiB "
                      f"+ {margin_gib:g} GiB margin > {budget_gib:.2f} GiB: {shots} shots "
                      "pass by pass, each expert loaded once (measured "
                      f"{measured('classic, 32 GiB free', 'one-prompt', 'pass-major')} faster "
                      "than one prompt per shot at 32 GiB free, "
                      f"{measured('classic, 14 GiB free', 'one-prompt', 'pass-major')} at 14)")
    return False, ("classic loader: one prompt per shot, ComfyUI loads what fits (measured "
                   "faster than the staged split: "
                   f"{measured('classic, 32 GiB free', 'staged', 'one-prompt')} at 32 GiB, "
                   f"{measured('classic, 14 GiB free', 'staged', 'one-prompt')} at 14); the "
                   "broker sizes the decode")


def plan_shot(model: CostModel, frames: int, width: int, height: int, *, budget_gib: float,
              margin_gib: float = 1.0, llm_gib: float = 0.0,
              llm_controllable: bool = True, memory_mode: str = "estimate",
              strategy: str = "auto") -> BrokerPlan:
    """Decide expert residency, block swap, decode mode and LLM placement for one shot.

    memory_mode says who manages VRAM inside ComfyUI: "estimate" (the classic loader: the
    broker plans experts and decode), "dynamic" (ComfyUI 0.33's dynamic VRAM: measured to
    beat every split, so the broker steps aside and keeps ComfyUI's models loaded), "cpu"
    (no VRAM at all). `strategy` forces one-prompt or staged rendering."""
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    check_inputs(frames, width, height, budget_gib=budget_gib, margin_gib=margin_gib,
                 llm_gib=llm_gib)
    c = model.shot(frames, width, height)
    budget, margin = int(budget_gib * GIB), int(margin_gib * GIB)
    llm = int(llm_gib * GIB)
    # An uncontrollable LLM keeps its VRAM: count it as taken for every stage.
    usable = budget - (0 if llm_controllable else llm)
    decisions: list[Decision] = []
    peaks: dict[str, int] = {}

    if strategy in ("auto", "one-prompt") or (strategy == "staged"
                                              and model.spec.experts < 2):
        _floor(model, c, usable, margin, memory_mode)
        experts, expert_peak = _managed(model, c, usable, margin, memory_mode, strategy, decisions)
    elif strategy == "staged":
        one = c.expert + c.activations + c.context
        decisions.append(Decision("experts", "unload-high-before-low", gib(one), gib(usable),
                                  "staged rendering forced by broker.strategy"))
        experts, expert_peak = c.expert, one
    else:
        experts, expert_peak = _experts(model, c, usable, margin, decisions)
    peaks["high"] = expert_peak
    peaks["low"] = expert_peak
    if memory_mode == "estimate":
        peaks["encode"] = _encode(c, usable, margin, decisions)
        peaks["decode"] = _decode(model, c, usable, margin, experts, decisions)
    else:
        peaks["encode"], peaks["decode"] = _left_to_comfyui(c, usable, memory_mode, decisions)
    video_peak = max(peaks.values())
    decisions.insert(0, _llm(llm, video_peak, budget, margin, llm_controllable))
    if not llm_controllable:
        peaks = {k: v + llm for k, v in peaks.items()}
    return BrokerPlan(model.spec.name, frames, width, height, budget_gib, margin_gib,
                      llm_gib, c.gib(), decisions, {k: gib(v) for k, v in peaks.items()})


def _managed(model: CostModel, c: ShotCost, usable: int, margin: int, memory_mode: str,
             strategy: str, out: list[Decision]) -> tuple[int, int]:
    """One prompt per shot; ComfyUI loads, offloads and keeps its models itself: what does
    not fit it streams from host RAM (predicted resident: what fits beside the rest)."""
    resident = min(model.spec.experts * c.expert,
                   max(usable - c.activations - c.context - margin, 0))
    peak = resident + c.activations + c.context
    why = {"dynamic": "ComfyUI's dynamic VRAM streams the experts and keeps them between "
                      "shots; measured "
                      f"{measured('dynamic, 32 GiB free', 'staged', 'one-prompt')} faster "
                      "than a staged split at 32 GiB free",
           "cpu": "ComfyUI runs on the CPU: no VRAM to manage",
           "estimate": "ComfyUI's classic loader loads what fits and offloads the rest; "
                       "measured "
                       f"{measured('classic, 32 GiB free', 'staged', 'one-prompt')} (32 GiB "
                       f"free) to {measured('classic, 14 GiB free', 'staged', 'one-prompt')} "
                       "(14 GiB) faster than the broker's staged split"}[memory_mode]
    if strategy == "one-prompt":
        why = "one prompt per shot, forced by broker.strategy; " + why
    out.append(Decision("experts", "one-prompt", gib(peak), gib(usable), why,
                        {"managed_by": "comfyui"}))
    return resident, peak


def _floor(model: CostModel, c: ShotCost, usable: int, margin: int, memory_mode: str) -> None:
    """The least any strategy needs (activations, context, two blocks streamed, margin):
    below it the shot is refused before any GPU work."""
    floor = c.activations + c.context + 2 * model.spec.block_bytes + margin
    if memory_mode != "cpu" and floor > usable:
        raise BudgetTooSmall(
            f"{c.frames} frames at {c.width}x{c.height} on {c.model} cannot fit "
            f"{gib(usable)} GiB: activations {gib(c.activations)} GiB + CUDA context "
            f"{gib(c.context)} GiB + two swap blocks {gib(2 * model.spec.block_bytes)} GiB + "
            f"margin {gib(margin)} GiB = {gib(floor)} GiB at the very least")


def _experts(model: CostModel, c: ShotCost, usable: int, margin: int,
             out: list[Decision]) -> tuple[int, int]:
    """Returns (expert bytes left resident after sampling, peak of the sampling stages)."""
    both = all_experts_peak(c, model.spec.experts)
    one = c.expert + c.activations + c.context
    if model.spec.experts == 2 and both + margin <= usable:
        out.append(Decision("experts", "keep-both-experts", gib(both), gib(usable),
                            f"both experts ({gib(2 * c.expert)} GiB) + activations "
                            f"({gib(c.activations)} GiB) + context fit with "
                            f"{gib(usable - both)} GiB spare: no reload between passes"))
        return 2 * c.expert, both
    if one + margin <= usable:
        action = "unload-high-before-low" if model.spec.experts == 2 else "keep-model"
        why = (f"both experts would need {gib(both)} GiB > {gib(usable - margin)} GiB: "
               f"unload the high-noise expert before the low-noise pass"
               if model.spec.experts == 2 else "model + activations fit")
        out.append(Decision("experts", action, gib(one), gib(usable), why))
        return c.expert, one
    over = one + margin - usable
    n = model.swap_blocks_needed(over)
    resident = c.expert - (n - 1) * model.spec.block_bytes
    floor = c.activations + c.context + 2 * model.spec.block_bytes + margin
    if n >= model.spec.blocks or floor > usable:
        raise BudgetTooSmall(
            f"{c.frames} frames at {c.width}x{c.height} on {c.model} cannot fit "
            f"{gib(usable)} GiB: activations {gib(c.activations)} GiB + CUDA context "
            f"{gib(c.context)} GiB + two swap blocks {gib(2 * model.spec.block_bytes)} GiB + "
            f"margin {gib(margin)} GiB = {gib(floor)} GiB at the very least")
    peak = resident + c.activations + c.context
    out.append(Decision("experts", "block-swap", gib(peak), gib(usable),
                        f"one expert + activations need {gib(one)} GiB, {gib(over)} GiB over:"
                        f" keep {n - 1} of {model.spec.blocks} blocks "
                        f"({gib(model.spec.block_bytes)} GiB each) in host RAM, 1 prefetch",
                        {"blocks_to_swap": n - 1, "unload_high_before_low":
                            model.spec.experts == 2}))
    return resident, peak


def _left_to_comfyui(c: ShotCost, usable: int, memory_mode: str, out: list[Decision]
                     ) -> tuple[int, int]:
    """With dynamic VRAM (or no GPU) ComfyUI places the text encoder and sizes the decode
    itself: a 1280x720x161 decode with 14 GiB free ran in 11.3 s, chunked by ComfyUI."""
    who = "ComfyUI's dynamic VRAM" if memory_mode == "dynamic" else "the CPU server"
    enc = c.text_encoder + c.context
    out.append(Decision("encode", "text-encoder-default", gib(enc), gib(usable),
                        f"{who} places the text encoder"))
    full = c.vae_weights + c.decode_full + c.context
    out.append(Decision("decode", "decode-full", gib(full), gib(usable),
                        f"{who} sizes the decode (it chunks it when memory is short)"))
    return enc, full


def _encode(c: ShotCost, usable: int, margin: int, out: list[Decision]) -> int:
    need = c.text_encoder + c.context
    if need + margin <= usable:
        out.append(Decision("encode", "text-encoder-on-gpu", gib(need), gib(usable),
                            "text encoder fits; it is unloaded before sampling"))
        return need
    out.append(Decision("encode", "text-encoder-on-cpu", gib(c.context), gib(usable),
                        f"text encoder ({gib(c.text_encoder)} GiB) does not fit beside the "
                        "margin: encode on the CPU (CLIPLoader device=cpu)"))
    return c.context


def _decode(model: CostModel, c: ShotCost, usable: int, margin: int, resident: int,
            out: list[Decision]) -> int:
    """Full decode with as many experts kept as fit (each kept expert is a reload saved for
    the next shot); tiled only when a full decode cannot fit at all."""
    full = c.vae_weights + c.decode_full + c.context
    if resident + full + margin <= usable:
        out.append(Decision("decode", "decode-full", gib(resident + full), gib(usable),
                            f"full decode ({gib(c.decode_full)} GiB) fits beside the resident"
                            f" experts ({gib(resident)} GiB)"))
        return resident + full
    if resident > c.expert and c.expert + full + margin <= usable:
        out.append(Decision("decode", "unload-high-then-decode-full", gib(c.expert + full),
                            gib(usable),
                            f"both experts + full decode need {gib(resident + full)} GiB: "
                            "unload the high-noise expert (done), keep the low-noise one",
                            {"unload": "high"}))
        return c.expert + full
    if full + margin <= usable:
        out.append(Decision("decode", "unload-then-decode-full", gib(full), gib(usable),
                            f"resident experts ({gib(resident)} GiB) + full decode "
                            f"({gib(full)} GiB) exceed the budget: unload models first",
                            {"unload": "all", "unload_models": True}))
        return full
    for tile, overlap, temporal, t_overlap in TILE_CHOICES:
        need = c.vae_weights + c.context + model.tiled_decode_bytes(tile, overlap, temporal,
                                                                      c.frames)
        if need + margin <= usable:
            out.append(Decision("decode", "unload-then-decode-tiled", gib(need), gib(usable),
                                f"full decode needs {gib(full)} GiB > {gib(usable - margin)}"
                                f" GiB: tiled {tile}px/{temporal} frames needs {gib(need)}",
                                {"unload": "all", "unload_models": True, "tile_size": tile,
                                 "overlap": overlap, "temporal_size": temporal,
                                 "temporal_overlap": t_overlap}))
            return need
    raise BudgetTooSmall(f"even the smallest tiled decode needs more than {gib(usable)} GiB")


def _llm(llm: int, video_peak: int, budget: int, margin: int, controllable: bool) -> Decision:
    spare = budget - video_peak - margin
    if llm == 0:
        return Decision("llm", "none", 0.0, gib(spare), "no LLM on this GPU")
    if not controllable:
        return Decision("llm", "uncontrolled", gib(llm), gib(spare),
                        "this LLM backend cannot be moved; its VRAM is counted as taken")
    if llm <= spare:
        return Decision("llm", "keep-on-gpu", gib(llm), gib(spare),
                        f"LLM ({gib(llm)} GiB) fits beside the video peak")
    if spare >= llm // 4:
        share = round(spare / llm, 2)
        return Decision("llm", "partial-offload", gib(llm), gib(spare),
                        f"only {gib(spare)} GiB spare: keep {int(share * 100)}% of the LLM's "
                        "layers on the GPU", {"gpu_fraction": share})
    return Decision("llm", "unload", gib(llm), gib(spare),
                    f"LLM ({gib(llm)} GiB) does not fit beside the video peak "
                    f"({gib(video_peak)} GiB) in {gib(budget)} GiB: unload it for video work")


# -- the keyframe stage ----------------------------------------------------------------------

def keyframe_peak_gib(model: CostModel | None, width: int, height: int, *, budget_gib: float,
                      margin_gib: float, other_gib: float | None = None) -> float:
    """A keyframe's VRAM peak: a Wan model at one frame as the shot planner sees it, or the
    binding's `vram_gib` for another image model (8 GiB when it gives none)."""
    if model is None:
        return other_gib if other_gib is not None else 8.0
    try:
        return plan_shot(model, 1, width, height, budget_gib=budget_gib,
                         margin_gib=margin_gib).peak_gib
    except BudgetTooSmall:  # not even one frame fits: say so through the numbers
        return gib(model.spec.expert_bytes + model.shot(1, width, height).activations)


def plan_keyframe(keyframe_gib: float, video_gib: float, *, budget_gib: float,
                  margin_gib: float, keyframes: int, clips: int, shared_models: bool,
                  memory_mode: str = "estimate") -> Decision:
    """Order and residency of the keyframe stage. Every keyframe first, then every clip:
    the keyframe model loads once and the video models once, instead of both once per shot
    when each shot's keyframe comes right before its clip (no clip needs another's
    keyframe, so nothing is lost by the order). Between the stages the keyframe model is
    unloaded when it and the video peak do not fit the budget together."""
    loads = {"keyframes_first": 2 if not shared_models else 1,
             "interleaved": 2 * min(keyframes, clips) if not shared_models else 1}
    params: dict[str, Any] = {"order": "keyframes-first", "keyframes": keyframes,
                              "model_loads": loads, "unload_after": False}
    both = keyframe_gib + video_gib + margin_gib
    if shared_models:
        return Decision("keyframe", "keyframes-first-keep-loaded", keyframe_gib, budget_gib,
                        "the keyframe workflow uses the video workflow's model files: "
                        "they stay loaded for the clips", params)
    if memory_mode != "estimate":
        return Decision("keyframe", "keyframes-first", keyframe_gib, budget_gib,
                        "ComfyUI manages its models (dynamic VRAM or CPU): it swaps the "
                        f"keyframe model out itself; {loads['keyframes_first']} model loads "
                        f"instead of {loads['interleaved']}", params)
    if both <= budget_gib:
        return Decision("keyframe", "keyframes-first-keep-loaded", keyframe_gib, budget_gib,
                        f"keyframe model ({keyframe_gib:.2f} GiB) + video peak "
                        f"({video_gib:.2f} GiB) + margin fit {budget_gib:.2f} GiB", params)
    return Decision("keyframe", "keyframes-first-unload-after", keyframe_gib, budget_gib,
                    f"keyframe model ({keyframe_gib:.2f} GiB) + video peak ({video_gib:.2f} "
                    f"GiB) + margin = {both:.2f} GiB > {budget_gib:.2f} GiB: unload it after "
                    f"the keyframes; {loads['keyframes_first']} model loads instead of "
                    f"{loads['interleaved']}", {**params, "unload_after": True})
