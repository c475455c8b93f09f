"""The broker at run time: reads VRAM, plans each shot, acts, and logs every decision with
the numbers behind it (stage, predicted need, free VRAM, action, outcome)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .cost_model import GIB, CostModel
from .gpu import GpuMonitor, GpuUnavailable, settled_free_gib
from .llm_control import LLMControl
from .policy import (
    TILE_CHOICES,
    BrokerPlan,
    BudgetTooSmall,
    Decision,
    all_experts_peak,
    keyframe_peak_gib,
    pass_major_case,
    plan_keyframe,
    plan_shot,
)

log = logging.getLogger(__name__)
DEFAULT_NO_GPU_BUDGET_GIB = 24.0


@dataclass
class BrokerEvent:
    stage: str
    action: str
    predicted_gib: float
    free_gib: float | None
    reason: str
    outcome: str
    shot_id: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodeChoice:
    tiled: bool
    unload_models: bool
    params: dict[str, int]


class Broker:
    def __init__(self, monitor: GpuMonitor, cost: CostModel, *, budget_gib: float | None,
                 margin_gib: float = 1.0, restart_every_n_scenes: int = 0,
                 leak_threshold_gib: float = 1.5, leak_check_every_n_scenes: int = 4,
                 llm: LLMControl | None = None,
                 memory_mode: str = "estimate", strategy: str = "auto") -> None:
        self.monitor, self.cost = monitor, cost
        self.memory_mode = memory_mode  # who manages VRAM in ComfyUI (policy.MEMORY_MODES)
        self.strategy = strategy
        self.margin_gib = margin_gib
        self.restart_every = restart_every_n_scenes
        self.leak_threshold_gib = leak_threshold_gib
        self.leak_every = max(1, leak_check_every_n_scenes)
        self.llm = llm
        self.events: list[BrokerEvent] = []
        self.baseline_free_gib: float | None = None
        self._scenes_done: set[int] = set()
        self.budget_gib = self._budget(budget_gib)
        # Set by the engine's session: makes ComfyUI give its VRAM back, and waits for it.
        self.free_vram: Callable[[], None] | None = None
        self.sleep: Callable[[float], None] = time.sleep  # tests pass a no-op

    @property
    def acts(self) -> bool:
        """False in no-GPU mode: decisions are still made and logged, not carried out."""
        return self.monitor.available

    def _budget(self, configured: float | None) -> float:
        if not self.monitor.available:
            return configured or DEFAULT_NO_GPU_BUDGET_GIB
        total = self.monitor.read().total_gib
        if configured is not None and configured > total:
            log.warning("budget %.1f GiB is more than the card's %.1f GiB; using the card's",
                        configured, total)
        return min(configured or total, total)

    def free_gib(self, *, settled: bool = False) -> float | None:
        """Free VRAM now, or once it stopped rising (after a /free); None without a reading."""
        if not self.monitor.available:
            return None
        try:
            if settled:
                return settled_free_gib(self.monitor, sleep=self.sleep)
            return self.monitor.read().free_gib
        except GpuUnavailable as err:
            log.warning("cannot read VRAM (%s): deciding from the plan alone", err)
            return None

    def record(self, event: BrokerEvent) -> BrokerEvent:
        self.events.append(event)
        free = "n/a" if event.free_gib is None else f"{event.free_gib:.2f} GiB"
        log.info("broker %s%s: %s (need %.2f GiB, free %s) -> %s: %s",
                 event.stage, f" [{event.shot_id}]" if event.shot_id else "", event.action,
                 event.predicted_gib, free, event.outcome, event.reason)
        return event

    # -- planning --------------------------------------------------------------------------
    def plan(self, frames: int, width: int, height: int, shot_id: str = "") -> BrokerPlan:
        llm_gib = self.llm.gpu_gib() if self.llm else 0.0
        controllable = self.llm.controllable if self.llm else True
        try:
            p = plan_shot(self.cost, frames, width, height, budget_gib=self.budget_gib,
                          margin_gib=self.margin_gib, llm_gib=llm_gib,
                          llm_controllable=controllable, memory_mode=self.memory_mode,
                          strategy=self.strategy)
        except BudgetTooSmall as err:
            self.record(BrokerEvent("plan", "refuse", 0.0, self.free_gib(), str(err),
                                    "stopped before any GPU work", shot_id))
            raise
        for d in p.decisions:
            if d.stage in ("experts", "encode"):
                self.record(BrokerEvent(d.stage, d.action, d.predicted_gib, None, d.reason,
                                        "planned", shot_id, d.params))
        return p

    def learn(self, p: BrokerPlan, measured_peak_gib: float) -> None:
        """Refine the per-machine calibration from a measured peak: the difference from the
        prediction is put on the activations, the part that varies per shot."""
        if not self.acts or measured_peak_gib <= 0:
            return
        c = self.cost.shot(p.frames, p.width, p.height)
        if c.activations <= self.cost.calibration.act_floor:
            return  # a shot under the floor says nothing about the per-token figure
        fixed = p.peak_gib * GIB - c.activations
        measured_act = int(measured_peak_gib * GIB - fixed)
        self.cost.calibration.refine("act", c.activations, max(measured_act, 1))

    def shrink_after_oom(self, shot_id: str, message: str, step_gib: float = 2.0) -> float:
        """An OOM means the model under-predicted here: plan leaner from now on."""
        old = self.budget_gib
        self.budget_gib = max(1.0, old - step_gib)
        self.record(BrokerEvent("oom", "shrink-budget", 0.0, self.free_gib(),
                                f"out of memory: {message[:200]}",
                                f"budget {old:.1f} -> {self.budget_gib:.1f} GiB; shot retried",
                                shot_id))
        return self.budget_gib

    def plan_keyframes(self, keyframe_model: str, frames: int, width: int, height: int, *,
                       keyframes: int, clips: int, shared_models: bool,
                       other_gib: float | None = None) -> Decision:
        """The keyframe stage's plan (order, unload between keyframes and clips), logged
        like every other stage."""
        model = CostModel.for_model(keyframe_model) if keyframe_model != "other" else None
        kf = keyframe_peak_gib(model, width, height, budget_gib=self.budget_gib,
                               margin_gib=self.margin_gib, other_gib=other_gib)
        try:  # the clips' peak, planned quietly: their own plans are logged per shot
            video = plan_shot(self.cost, frames, width, height, budget_gib=self.budget_gib,
                              margin_gib=self.margin_gib, memory_mode=self.memory_mode,
                              strategy=self.strategy).peak_gib
        except BudgetTooSmall:
            video = self.budget_gib
        d = plan_keyframe(kf, video, budget_gib=self.budget_gib, margin_gib=self.margin_gib,
                          keyframes=keyframes, clips=clips, shared_models=shared_models,
                          memory_mode=self.memory_mode)
        self.record(BrokerEvent("keyframe", d.action, d.predicted_gib, self.free_gib(),
                                d.reason, "planned", "keyframes", d.params))
        return d

    # -- LLM placement ---------------------------------------------------------------------
    def pass_major_pays(self, shots: int, frames: int, width: int, height: int) -> bool:
        """Batch the shots pass by pass? Only where measured to win (policy.MEASURED): the
        classic loader when both experts do not fit together. Logged with the numbers."""
        c = self.cost.shot(frames, width, height)
        pays, why = pass_major_case(c, self.cost.spec.experts, memory_mode=self.memory_mode,
                                    strategy=self.strategy, shots=shots,
                                    budget_gib=self.budget_gib, margin_gib=self.margin_gib)
        if pays:  # clip by clip is the default: only a change of course is news
            both = all_experts_peak(c, self.cost.spec.experts)
            self.record(BrokerEvent("batch", "pass-major", both / GIB, self.free_gib(), why,
                                    "planned"))
        return pays

    def place_llm_for_video(self, p: BrokerPlan) -> BrokerEvent:
        d = p.decision("llm")
        if self.llm is None or d.action in ("none", "keep-on-gpu"):
            outcome = "kept" if d.action == "keep-on-gpu" else "no LLM on the GPU"
        elif not self.acts:
            outcome = "no GPU: not carried out"
        elif d.action == "unload":
            outcome = self.llm.release(0.0)
        elif d.action == "partial-offload":
            outcome = self.llm.release(float(d.params["gpu_fraction"]))
        else:
            outcome = self.llm.release(0.0)  # uncontrolled: says why nothing moved
        return self.record(BrokerEvent("llm", d.action, d.predicted_gib, self.free_gib(),
                                       d.reason, outcome, params=d.params))

    def restore_llm(self) -> BrokerEvent | None:
        """After the video work. ComfyUI's dynamic VRAM keeps its models in whatever memory
        is free (measured: the card stayed full after the last shot), so it is told to free
        them first; otherwise the LLM's reload finds no room."""
        if self.llm is None or not self.acts:
            return None
        if self.free_vram is not None and self.llm.controllable:
            self.free_vram()
        free = self.free_gib()
        outcome = self.llm.restore()
        # what the LLM holds once back (before the restore an unloaded LLM holds 0)
        return self.record(BrokerEvent("llm", "restore", self.llm.gpu_gib(), free,
                                       "video work done: the LLM gets its GPU share back",
                                       outcome))

    # -- decode headroom -------------------------------------------------------------------
    def decode_headroom(self, p: BrokerPlan, shot_id: str,
                        free_models: Callable[[], None]) -> DecodeChoice:
        """Before a VAE decode: full when it fits now, else free, else tiled; never a decode
        that the driver would have to spill."""
        planned = p.decision("decode")
        c = self.cost.shot(p.frames, p.width, p.height)
        need_full = (c.vae_weights + c.decode_full) / GIB + self.margin_gib
        free = self.free_gib()
        if self.memory_mode != "estimate":  # ComfyUI sizes (and chunks) its own decode
            self.record(BrokerEvent("decode", planned.action, planned.predicted_gib, free,
                                    planned.reason, "left to ComfyUI", shot_id))
            return DecodeChoice(False, False, {})
        if free is None:  # no GPU or no reading: follow the plan
            tiled = "tiled" in planned.action
            self.record(BrokerEvent("decode", planned.action, planned.predicted_gib, None,
                                    planned.reason, "planned only (no VRAM reading)",
                                    shot_id, planned.params))
            return DecodeChoice(tiled, bool(planned.params.get("unload_models")),
                                {k: v for k, v in planned.params.items()
                                 if isinstance(v, int) and not isinstance(v, bool)})
        if free >= need_full:
            self.record(BrokerEvent("decode", "decode-full", need_full, free,
                                    f"{free:.2f} GiB free >= {need_full:.2f} GiB needed",
                                    "full decode", shot_id))
            return DecodeChoice(False, False, {})
        free_models()
        after = self.free_gib() or 0.0
        if after >= need_full:
            self.record(BrokerEvent("decode", "unload-then-decode-full", need_full, after,
                                    f"only {free:.2f} GiB free; after unloading models "
                                    f"{after:.2f} GiB", "full decode", shot_id))
            return DecodeChoice(False, True, {})
        for tile, overlap, temporal, t_overlap in TILE_CHOICES:
            need = (c.vae_weights + self.cost.tiled_decode_bytes(tile, overlap, temporal,
                                                                 p.frames)) / GIB
            if after >= need + self.margin_gib:
                params = {"tile_size": tile, "overlap": overlap, "temporal_size": temporal,
                          "temporal_overlap": t_overlap}
                self.record(BrokerEvent("decode", "decode-tiled", need, after,
                                        f"full decode needs {need_full:.2f} GiB but only "
                                        f"{after:.2f} GiB free after unloading",
                                        f"tiled {tile}px x {temporal} frames", shot_id,
                                        params))
                return DecodeChoice(True, True, params)
        reason = f"only {after:.2f} GiB free even after unloading: any decode would spill"
        self.record(BrokerEvent("decode", "refuse", need_full, after, reason,
                                "shot stopped", shot_id))
        raise BudgetTooSmall(reason)

    # -- ComfyUI health between shots --------------------------------------------------------
    def between_shots(self, scene_index: int, shot_id: str, free_memory: Callable[[], None],
                      restart: Callable[[str], None] | None) -> str | None:
        """After a shot: restart ComfyUI every N scenes (a schedule needs no VRAM reading),
        or when free VRAM after /free crept below the baseline (only where VRAM is read).
        The leak check runs at the first scene and then every `leak_every` scenes, not after
        every shot: its /free drops the models ComfyUI keeps between shots, and reloading
        them cost 8 to 10 s a clip on the H100 (30 s for a first clip, 20 to 22 s for the
        next), while a leak is a slow creep. Returns the restart reason, if any."""
        new_scene = scene_index not in self._scenes_done
        self._scenes_done.add(scene_index)
        n = len(self._scenes_done)
        reason = None
        if self.restart_every and new_scene and n > 1 and (n - 1) % self.restart_every == 0:
            reason = f"scheduled: every {self.restart_every} scene(s)"
        check = self.acts and new_scene and (n - 1) % self.leak_every == 0
        free = self._leak_check(free_memory, shot_id) if check and reason is None else None
        if reason is None and free is not None and self._creep(free) > self.leak_threshold_gib:
            reason = (f"memory creep: {free:.2f} GiB free after /free vs baseline "
                      f"{self.baseline_free_gib:.2f} GiB (> {self.leak_threshold_gib} GiB)")
        if reason is None:
            return None
        if restart is None:
            self.record(BrokerEvent("restart", "restart-unavailable", 0.0, free, reason,
                                    "attached ComfyUI: restart it yourself", shot_id))
            return reason
        restart(reason)
        after = self.free_gib()
        self.record(BrokerEvent("restart", "restart-comfyui", 0.0, free, reason,
                                "restarted" + (f"; {after:.2f} GiB free" if after is not None
                                               else " (no VRAM reading)"), shot_id))
        if after is not None:
            self.baseline_free_gib = after
        return reason

    def _creep(self, free: float) -> float:
        return 0.0 if self.baseline_free_gib is None else self.baseline_free_gib - free

    def _leak_check(self, free_memory: Callable[[], None], shot_id: str) -> float | None:
        """Free VRAM after /free, once settled; a creep counts only if a second /free
        confirms it. In the H100 soaks a reading 1 s after /free found 10 to 13.5 GiB more
        in use after 21 of 47 prompts, while the lowest reading moved by 0.01 GiB over all
        of them: a leak stays after a second /free, memory still being released does not."""
        free = self._free_after_release(free_memory)
        if free is None or self._creep(free) <= self.leak_threshold_gib:
            return free
        again = self._free_after_release(free_memory)
        if again is not None and self._creep(again) <= self.leak_threshold_gib:
            self.record(BrokerEvent(
                "restart", "leak-check", 0.0, again,
                f"{free:.2f} GiB free after the first /free, {again:.2f} GiB after a second "
                f"(baseline {self.baseline_free_gib:.2f} GiB): ComfyUI was still releasing",
                "no restart", shot_id))
        return again

    def _free_after_release(self, free_memory: Callable[[], None]) -> float | None:
        """Free VRAM once ComfyUI let go of its models. The baseline is the most ever seen
        after a /free, so a first reading taken while ComfyUI still held memory cannot hide
        a later leak."""
        free_memory()
        free = self.free_gib(settled=True)
        if free is None:
            return None
        if self.baseline_free_gib is None or free > self.baseline_free_gib:
            self.baseline_free_gib = free
        return free
