"""The broker's numbers and actions, with a scripted GPU monitor (never a real GPU)."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workflows
from resource_broker.broker import Broker
from resource_broker.cost_model import GIB, Calibration, CostModel, latent_frames, tokens
from resource_broker.gpu import (
    GpuReading,
    GpuUnavailable,
    NoGpuMonitor,
    open_monitor,
    settled_free_gib,
)
from resource_broker.llm_control import NoLLM, UncontrolledLLM
from resource_broker.policy import BudgetTooSmall, plan_shot
from resource_broker.timeline import Sample, Timeline, VramSampler
from story_to_video.engines.comfyui import (
    AttachedComfyUI,
    BoundWorkflow,
    ComfyUIClient,
    ComfyUIEngine,
)
from story_to_video.engines.video_io import probe
from story_to_video.models import Shot
from tests.fake_comfyui import FakeComfyUI

M14 = CostModel.for_model("wan2.2-14b")


class ScriptedMonitor:
    """Free VRAM follows a script; `fail_after` reads make it raise like a dying NVML."""

    def __init__(self, total_gib: float, free: list[float], fail_after: int | None = None
                 ) -> None:
        self.total, self.free, self.reads, self.fail_after = total_gib, list(free), 0, \
            fail_after

    @property
    def available(self) -> bool:
        return True

    def describe(self) -> str:
        return "scripted"

    def read(self) -> GpuReading:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise GpuUnavailable("NVML: GPU is lost")
        free = self.free.pop(0) if len(self.free) > 1 else self.free[0]
        t = int(self.total * GIB)
        return GpuReading(0, "scripted", t, t - int(free * GIB), int(free * GIB), ())


def settled(free_gib: float) -> list[float]:
    """The reads of one settled reading that finds the free memory standing still: the
    first, then `stable_s` (2 s) of 0.5 s polls."""
    return [free_gib] * 5


def test_tokens_follow_wan_geometry() -> None:
    assert latent_frames(81) == 21
    assert tokens(M14.spec, 81, 832, 480) == 21 * 30 * 52 == 32760  # anchor: 32,760
    assert tokens(CostModel.for_model("wan2.2-5b").spec, 121, 1280, 704) == 31 * 22 * 40


def test_cost_model_matches_the_anchors() -> None:
    c = M14.shot(81, 832, 480)
    assert c.activations / GIB == pytest.approx(3.47, rel=0.02)
    assert c.decode_full / GIB == pytest.approx(4.38, rel=0.02)
    assert M14.shot(81, 1280, 720).decode_full / GIB == pytest.approx(10.1, rel=0.02)
    assert M14.shot(161, 832, 480).activations / GIB == pytest.approx(6.78, rel=0.02)
    assert M14.shot(81, 1280, 720).activations / GIB == pytest.approx(8.01, rel=0.02)


def test_decode_follows_the_frame_area_and_grows_with_length_by_the_clip_only() -> None:
    """Measured on real ComfyUI (vram-peak.json): 832x480 took 3.25, 3.37 and 3.55 GiB at 33,
    81 and 161 frames; 80 more frames cost their bf16 RGB (6 B a pixel), nothing more."""
    d = {f: M14.shot(f, 832, 480).decode_full for f in (33, 81, 161)}
    assert d[161] - d[81] == 80 * 832 * 480 * 6
    assert d[81] - d[33] == 48 * 832 * 480 * 6


@pytest.mark.parametrize(("frames", "action"), [
    (33, "keep-both-experts"), (81, "unload-high-before-low"),
    (161, "unload-high-before-low")])
def test_expert_policy_at_32_gib(frames: int, action: str) -> None:
    p = plan_shot(M14, frames, 832, 480, budget_gib=32, strategy="broker")
    assert p.decision("experts").action == action
    assert p.peak_gib <= 32 - 1.0  # never plans past budget minus margin


def test_block_swap_count_comes_from_the_model() -> None:
    p = plan_shot(M14, 81, 832, 480, budget_gib=16, strategy="broker")
    d = p.decision("experts")
    assert d.action == "block-swap"
    over = (13.57 + 3.46 + 0.55 + 1.0) - 16
    assert d.params["blocks_to_swap"] == -(-int(over * GIB) // M14.spec.block_bytes)
    assert p.decision("decode").action == "unload-then-decode-full"
    bf16 = plan_shot(CostModel.for_model("wan2.2-14b-bf16"), 81, 832, 480, budget_gib=24,
                     strategy="broker")
    assert bf16.decision("experts").params["blocks_to_swap"] > d.params["blocks_to_swap"]


def test_auto_follows_the_gpu_measurements() -> None:
    """What benchmarks/comfyui_gpu.py measured on real ComfyUI decides auto: one prompt per
    shot on either loader (the staged split lost 1.47-1.54x), pass by pass for batches on
    the classic loader only, where both experts do not fit (1.32x faster at 32 GiB)."""
    for mode in ("estimate", "dynamic"):
        p = plan_shot(M14, 81, 832, 480, budget_gib=32, memory_mode=mode)
        assert p.decision("experts").action == "one-prompt"
        assert "measured" in p.decision("experts").reason
    classic = Broker(ScriptedMonitor(80, [40.0]), CostModel.for_model("wan2.2-14b"),
                     budget_gib=32.0, memory_mode="estimate")
    assert classic.pass_major_pays(3, 81, 832, 480)
    assert not classic.pass_major_pays(1, 81, 832, 480)
    dynamic = Broker(ScriptedMonitor(80, [40.0]), CostModel.for_model("wan2.2-14b"),
                     budget_gib=32.0, memory_mode="dynamic")
    assert not dynamic.pass_major_pays(3, 81, 832, 480)
    roomy = Broker(ScriptedMonitor(80, [40.0]), CostModel.for_model("wan2.2-14b"),
                   budget_gib=80.0, memory_mode="estimate")
    assert not roomy.pass_major_pays(3, 81, 832, 480)  # both experts stay: nothing to save
    events = [e for e in classic.events if e.stage == "batch"]
    assert events[0].action == "pass-major"
    assert "need 31.15 GiB + 1 GiB margin > 32.00 GiB" in events[0].reason


def test_tiny_budget_is_refused_with_numbers() -> None:
    with pytest.raises(BudgetTooSmall) as exc:
        plan_shot(M14, 81, 832, 480, budget_gib=4)
    assert str(exc.value) == (
        "81 frames at 832x480 on wan2.2-14b cannot fit 4.0 GiB: activations 3.46 GiB + "
        "CUDA context 0.55 GiB + two swap blocks 0.68 GiB + margin 1.0 GiB = 5.68 GiB at "
        "the very least")


def test_decode_goes_tiled_when_even_unloading_is_not_enough() -> None:
    """The full decode's working set follows the frame's area: a 1920x1088 frame needs 22 GiB
    however short the clip, more than 19 GiB with every model unloaded."""
    assert M14.shot(17, 1920, 1088).decode_full / GIB == pytest.approx(22.2, abs=0.1)
    p = plan_shot(M14, 17, 1920, 1088, budget_gib=19, strategy="broker")
    d = p.decision("decode")
    assert d.action == "unload-then-decode-tiled"
    assert d.predicted_gib + 1.0 <= 19
    assert d.params["tile_size"] in (512, 384, 256, 192, 128)


def test_llm_placement() -> None:
    def plan(frames: int, llm: float, **kw: Any) -> Any:
        return plan_shot(M14, frames, 832, 480, budget_gib=32, strategy="broker", llm_gib=llm,
                         **kw)

    assert plan(81, 5).decision("llm").action == "keep-on-gpu"
    assert plan(33, 8).decision("llm").action == "unload"
    part = plan(81, 14).decision("llm")
    assert part.action == "partial-offload" and 0.25 <= part.params["gpu_fraction"] < 1
    unc = plan(81, 6, llm_controllable=False)
    assert unc.decision("llm").action == "uncontrolled"
    assert unc.stage_peaks_gib["decode"] == pytest.approx(18.73 + 6, abs=0.02)


def test_stage_rise_is_not_fooled_by_memory_let_go_as_the_stage_begins() -> None:
    """The H100 trace (vram-trace.json): torch held 13.56 GiB (the low expert) when the
    decode prompt began, dropped it, then the decode took 2.94 GiB for itself."""
    used = [13.56, 13.56, 0.03, 0.03, 0.27, 1.2, 2.97, 2.2, 2.83, 0.45, 0.27]
    tl = Timeline(samples=[Sample(0.1 * i, u, 0.0, "torch") for i, u in enumerate(used)])
    assert tl.peak_used_gib(0.05) == 13.56
    assert tl.rise_gib(0.05) == pytest.approx(2.94)
    assert tl.rise_gib(0.65) == pytest.approx(2.83 - 2.2)  # the lowest point in its window
    assert Timeline().rise_gib() == 0.0


def test_calibration_fits_measured_points() -> None:
    cal = Calibration()
    per = M14.spec.act_bytes_per_token
    cal.fit("act", [(20280.0, int(2.6 * GIB)), (48360.0, int(6.2 * GIB))], per)
    m = CostModel(M14.spec, cal)
    assert m.shot(49, 832, 480).activations / GIB == pytest.approx(2.6, rel=0.01)
    assert m.shot(121, 832, 480).activations / GIB == pytest.approx(6.2, rel=0.01)


def test_activation_floor_from_real_comfyui_applies_below_it_only() -> None:
    """The H100 calibration (benchmarks/calibrate_vram.py): small shots take the floor, big
    ones the per-token figure; a shot under the floor teaches the per-token scale nothing."""
    cal = Calibration.load(Path(__file__).parents[1] / "benchmarks" / "results"
                           / "vram-calibration-h100.json")
    assert 5.0 * GIB < cal.act_floor < 6.0 * GIB
    m = CostModel(M14.spec, cal)
    assert m.shot(33, 832, 480).activations == m.shot(81, 832, 480).activations == cal.act_floor
    assert m.shot(161, 832, 480).activations / GIB == pytest.approx(6.75, abs=0.05)
    b = Broker(ScriptedMonitor(80, [40.0]), m, budget_gib=32.0, margin_gib=1.0,
               strategy="broker")
    p = b.plan(33, 832, 480)
    b.learn(p, p.peak_gib + 3.0)
    assert m.calibration.act_scale == 1.0
    p = b.plan(161, 832, 480)
    b.learn(p, p.peak_gib + 1.0)
    assert m.calibration.act_scale > 1.0


def broker(monitor: Any, **kw: Any) -> Broker:
    """A broker with its own cost model: brokers learn, tests must not share what they learn."""
    kw.setdefault("strategy", "broker")  # the broker's own VRAM plan, whose mechanics these test
    b = Broker(monitor, CostModel.for_model("wan2.2-14b"),
               budget_gib=kw.pop("budget_gib", 32.0), margin_gib=1.0, **kw)
    b.sleep = lambda s: None  # readings follow the script, not the clock
    return b


def test_decode_headroom_full_free_tiled_refuse() -> None:
    p = plan_shot(M14, 81, 832, 480, budget_gib=32, strategy="broker")
    freed: list[int] = []
    b = broker(ScriptedMonitor(80, [20.0]))
    assert not b.decode_headroom(p, "s1", lambda: freed.append(1)).tiled
    assert freed == []
    b = broker(ScriptedMonitor(80, [40, 2.0, 9.0]))  # budget read, before, after /free
    choice = b.decode_headroom(p, "s1", lambda: freed.append(1))
    assert (choice.tiled, choice.unload_models, freed) == (False, True, [1])
    b = broker(ScriptedMonitor(80, [40, 2.0, 3.0]))
    choice = b.decode_headroom(p, "s1", lambda: None)
    assert choice.tiled and choice.params["tile_size"] <= 512
    ev = b.events[-1]
    assert (ev.stage, ev.action, ev.free_gib) == ("decode", "decode-tiled", 3.0)
    assert "full decode needs 5.62" in ev.reason
    b = broker(ScriptedMonitor(80, [40, 0.5, 0.6]))
    with pytest.raises(BudgetTooSmall, match="any decode would spill"):
        b.decode_headroom(p, "s1", lambda: None)


def test_restart_on_creep_and_schedule() -> None:
    restarts: list[str] = []
    frees: list[str] = []
    # budget read; scene 0: free still rising after /free, settles at 30; scene 1: 27.9 twice
    b = broker(ScriptedMonitor(80, [40, 29.0, *settled(30.0), *settled(27.9), *settled(27.9),
                                    31.0]),
               restart_every_n_scenes=0, leak_check_every_n_scenes=1)
    assert b.between_shots(0, "s01", lambda: frees.append("s01"), restarts.append) is None
    assert b.baseline_free_gib == 30.0  # the settled reading, not the first one
    # within a scene the models ComfyUI keeps stay loaded: no /free, no reading
    assert b.between_shots(0, "s02", lambda: frees.append("s02"), restarts.append) is None
    reason = b.between_shots(1, "s03", lambda: frees.append("s03"), restarts.append)
    assert reason is not None and reason.startswith("memory creep: 27.90 GiB free")
    # the creep was confirmed by a second /free before the restart
    assert restarts == [reason] and frees == ["s01", "s03", "s03"]
    assert b.baseline_free_gib == 31.0
    # by default the check runs at the first scene, then every 4th
    b = broker(ScriptedMonitor(80, [40, 30.0]))
    frees.clear()
    for i in range(9):
        b.between_shots(i, f"s{i}", lambda i=i: frees.append(f"s{i}"), None)
    assert frees == ["s0", "s4", "s8"]
    b = broker(ScriptedMonitor(80, [40, 30.0]), restart_every_n_scenes=2)
    got = [b.between_shots(i, f"s{i}", lambda: None, restarts.append) for i in range(5)]
    assert got == [None, None, "scheduled: every 2 scene(s)", None,
                   "scheduled: every 2 scene(s)"]
    b = broker(ScriptedMonitor(80, [40, *settled(30.0), 20.0]), leak_check_every_n_scenes=1)
    b.between_shots(0, "a", lambda: None, None)
    b.between_shots(1, "b", lambda: None, None)
    assert b.events[-1].action == "restart-unavailable"


def test_leak_check_tells_a_slow_release_from_a_leak() -> None:
    """What the H100 soaks saw: 1 s after some /frees ComfyUI still held 10 to 13.5 GiB."""
    restarts: list[str] = []
    frees: list[int] = []
    # scene 0: 30 (baseline); scene 1: 16.5 after the first /free, 30 after a second
    b = broker(ScriptedMonitor(80, [40, *settled(30.0), *settled(16.5), 30.0]),
               leak_check_every_n_scenes=1)
    assert b.between_shots(0, "a", lambda: frees.append(0), restarts.append) is None
    assert b.between_shots(1, "b", lambda: frees.append(1), restarts.append) is None
    assert restarts == [] and frees == [0, 1, 1]
    ev = b.events[-1]
    assert (ev.action, ev.outcome, ev.free_gib) == ("leak-check", "no restart", 30.0)
    assert "16.50 GiB free after the first /free, 30.00 GiB after a second" in ev.reason
    # a first reading taken while ComfyUI still held an expert cannot hide a later leak:
    # the baseline rises to the most seen (30), and 28.2 twice is a creep of 1.8 GiB
    b = broker(ScriptedMonitor(80, [40, *settled(16.5), *settled(30.0), *settled(28.2),
                                         *settled(28.2), 30.0]),
               leak_check_every_n_scenes=1)
    assert b.between_shots(0, "a", lambda: None, restarts.append) is None
    assert b.between_shots(1, "b", lambda: None, restarts.append) is None
    assert b.baseline_free_gib == 30.0
    reason = b.between_shots(2, "c", lambda: None, restarts.append)
    assert reason == "memory creep: 28.20 GiB free after /free vs baseline 30.00 GiB (> 1.5 GiB)"
    assert restarts == [reason]


def test_settled_free_waits_until_free_memory_stops_rising() -> None:
    waits: list[float] = []
    # the soak's pattern: one expert goes, a pause, the other goes; then 2 s of no rise
    mon = ScriptedMonitor(80, [10.0, 16.0, 16.0, 29.6, 29.6, 29.6, 29.6, 29.6, 0.0])
    assert settled_free_gib(mon, sleep=waits.append) == pytest.approx(29.6)
    assert waits == [1.5] + [0.5] * 7 and mon.reads == 8
    # still rising at the timeout: the last reading
    mon = ScriptedMonitor(80, [float(i) for i in range(100)])
    assert settled_free_gib(mon, sleep=lambda s: None, timeout_s=2.0) == pytest.approx(4.0)


def test_no_gpu_mode_plans_but_does_not_act() -> None:
    b = Broker(NoGpuMonitor("NVML: library not found"), M14, budget_gib=32,
               llm=UncontrolledLLM("llama.cpp server", 4.0))
    p = b.plan(81, 832, 480, "s1")
    assert p.decision("llm").action == "uncontrolled"
    ev = b.place_llm_for_video(p)
    assert ev.outcome == "no GPU: not carried out"
    assert b.between_shots(0, "s1", lambda: None, None) is None
    assert not b.acts


def test_monitor_without_nvidia_and_bad_index(monkeypatch: pytest.MonkeyPatch) -> None:
    m = open_monitor(0)  # this machine has no NVIDIA driver
    assert not m.available and "no GPU" in m.describe()
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
                                 NVMLError=RuntimeError)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(GpuUnavailable, match=r"GPU index 3 does not exist; this machine has 1 "
                                             r"NVIDIA GPU \(0..0\)"):
        open_monitor(3)


def test_sampler_degrades_to_system_stats_when_nvml_fails() -> None:
    mon = ScriptedMonitor(32, [20.0], fail_after=2)
    sampler = VramSampler(mon, interval_s=0.01, fallback=lambda: (15.0, 17.0))
    with sampler:
        import time
        time.sleep(0.2)
    sources = [s.source for s in sampler.timeline.samples]
    assert sources[:2] == ["nvml", "nvml"] and sources[-1] == "system_stats"
    assert sampler.degraded
    assert sampler.timeline.peak_used_gib() == 15.0


@pytest.fixture()
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


def shot(frames: int) -> Shot:
    return Shot(id="s01_sh01", scene_index=0, shot_index=0, action="a", prompt="p",
                frames=frames, fps=16, width=832, height=480, seed=1)


def test_staged_render_unloads_high_expert_between_passes(fake: FakeComfyUI,
                                                           tmp_path: Path) -> None:
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(ScriptedMonitor(80, [40, 3.0, 3.0]))  # little free at decode
    fake.faults.step_delay_s = 0
    result = e.render(shot(81), tmp_path / "c.mp4")
    assert list(result.details["stage_seconds"]) == ["high", "low", "decode"]
    classes = [{n["class_type"] for n in p.values()} for p in fake.prompts]
    assert "SaveLatent" in classes[0] and "KSamplerAdvanced" in classes[0]
    assert {"LoadLatent", "SaveLatent"} <= classes[1]
    assert "VAEDecodeTiled" in classes[2] and "UNETLoader" not in classes[2]
    unet_names = {n["inputs"]["unet_name"] for n in fake.prompts[1].values()
                  if n["class_type"] == "UNETLoader"}
    assert unet_names == {"wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"}
    assert {"unload_models": True, "free_memory": False} in fake.free_calls
    actions = [a["action"] for a in result.details["vram"]["actions"]]
    assert actions[0] == "unload-high-before-low" and "decode-tiled" in actions


def test_single_prompt_when_both_experts_fit(fake: FakeComfyUI, tmp_path: Path) -> None:
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(ScriptedMonitor(80, [40.0]))
    result = e.render(shot(33), tmp_path / "c.mp4")
    assert len(fake.prompts) == 1
    assert result.details["vram"]["plan"]["decisions"][1]["action"] == "keep-both-experts"


def test_a_shot_without_a_vram_reading_records_none(fake: FakeComfyUI, tmp_path: Path) -> None:
    """Readings from before the shot are not its peak: with none inside the shot, the record
    has no measured peak (the report says "not measured") and the broker learns nothing."""
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(ScriptedMonitor(80, [40.0]))
    e.timeline = Timeline(samples=[Sample(0.0, 2.0, 78.0, "system_stats")], t0=time.monotonic())
    vram = e.render(shot(33), tmp_path / "c.mp4").details["vram"]
    assert "measured_peak_gib" not in vram and "min_free_gib" not in vram
    assert e.broker.cost.calibration.samples == 0
    e.timeline.samples.append(Sample(1e9, 30.0, 50.0, "nvml"))  # a reading inside the shot
    vram = e.render(shot(33).model_copy(update={"seed": 9}), tmp_path / "d.mp4").details["vram"]
    assert (vram["measured_peak_gib"], vram["min_free_gib"]) == (30.0, 50.0)


def test_llm_controls() -> None:
    assert NoLLM().release() .startswith("nothing to move")
    assert "counted as taken" in UncontrolledLLM("llama.cpp", 5).release()


def test_pass_major_loads_each_expert_once_per_batch(fake: FakeComfyUI,
                                                     tmp_path: Path) -> None:
    fake.faults.step_delay_s = 0
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(ScriptedMonitor(80, [40.0]))
    shots = [Shot(id=f"s01_sh0{i}", scene_index=0, shot_index=i, action="a", prompt=f"p{i}",
                  frames=81, fps=16, width=832, height=480, seed=i) for i in (1, 2, 3)]
    for s in shots:  # clip by clip, the high-noise expert unloaded before each low pass
        e.render(s, tmp_path / f"{s.id}.mp4")
    per_clip = len(fake.model_loads)
    fake.model_loads.clear()
    fake.loaded.clear()
    results = e.render_pass_major([s.model_copy(update={"seed": s.seed + 10}) for s in shots],
                                  [tmp_path / f"pm{i}.mp4" for i in range(3)])
    assert per_clip == 6  # two expert loads per clip
    assert len(fake.model_loads) == 2  # one per expert for the whole batch
    assert [probe(r.path).frames for r in results] == [81, 81, 81]


def test_broker_learns_from_measured_peaks(tmp_path: Path) -> None:
    b = broker(ScriptedMonitor(80, [40.0]))
    p = b.plan(81, 832, 480)
    before = b.cost.shot(81, 832, 480).activations
    b.learn(p, p.peak_gib + 1.0)  # the run needed 1 GiB more than predicted
    assert b.cost.shot(81, 832, 480).activations > before
    b.cost.calibration.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json").act_scale == b.cost.calibration.act_scale


def test_block_swap_decision_reaches_the_render(fake: FakeComfyUI, tmp_path: Path) -> None:
    fake.faults.step_delay_s = 0
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(ScriptedMonitor(80, [40.0]), budget_gib=16.0)
    result = e.render(shot(81), tmp_path / "c.mp4")
    swap = [a for a in result.details["vram"]["actions"]
            if a["action"] == "block-swap" and a["outcome"] != "planned"]
    assert swap and swap[0]["params"]["blocks_to_swap"] == 8
    assert "no block-swap node bound" in swap[0]["outcome"]
    assert list(result.details["stage_seconds"]) == ["high", "low", "decode"]


def staged_engine(fake: FakeComfyUI) -> ComfyUIEngine:
    e = ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), AttachedComfyUI(fake.url))
    e.broker = broker(NoGpuMonitor("test"), strategy="staged")
    return e


def test_classic_cache_keeps_staging_but_refuses_pass_major(fake: FakeComfyUI,
                                                            tmp_path: Path) -> None:
    """--cache-classic keeps only the previous prompt's outputs: a shot's low pass right after
    its high pass still finds the encoded prompt, a batch's low passes would not."""
    fake.cache_mode, fake.faults.step_delay_s = "classic", 0
    fake.argv.append("--cache-classic")
    e = staged_engine(fake)
    result = e.render(shot(17), tmp_path / "c.mp4")
    assert list(result.details["stage_seconds"]) == ["high", "low", "decode"]
    low = result.details["prompt_ids"]["low"]
    assert {"89", "72"} <= set(fake.history[low]["status"]["messages"][1][1]["nodes"])
    assert "re-run the text encoder" in (e.pass_major_refusal(3) or "")
    fake.argv[-1] = "--cache-none"
    e2 = staged_engine(fake)
    one = e2.render(shot(17).model_copy(update={"seed": 9}), tmp_path / "d.mp4")
    assert list(one.details["stage_seconds"]) == ["all"]  # a split would encode 3 times
    assert any(ev.action == "one-prompt" and "re-run the text encoder" in ev.reason
               for ev in e2.broker.events)  # type: ignore[union-attr]


def test_broker_plan_says_which_measured_case_applies() -> None:
    from typer.testing import CliRunner

    from story_to_video.cli import app

    base = ["broker", "plan", "--model", "wan2.2-14b", "--frames", "81", "--width", "832",
            "--height", "480", "--budget-gib", "32"]
    dyn = CliRunner().invoke(app, base)
    assert dyn.exit_code == 0 and "case: dynamic VRAM: one prompt per shot" in dyn.output
    old = CliRunner().invoke(app, [*base, "--memory-mode", "estimate", "--shots", "3"])
    assert ("case: classic loader, both experts + activations need 31.15 GiB + 1 GiB margin > "
            "32.00 GiB: 3 shots pass by pass, each expert loaded once (measured 1.32x faster"
            in old.output)
    one = CliRunner().invoke(app, [*base, "--memory-mode", "estimate", "--shots", "1"])
    assert "case: classic loader: one prompt per shot" in one.output
    assert "(measured: staged 1.52x, pass-major 1.04x to 1.07x slower)" in dyn.output
    bad = CliRunner().invoke(app, [*base, "--strategy", "fastest"])
    assert bad.exit_code == 2 and "strategy must be one of" in bad.output
