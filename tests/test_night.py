"""The night as one plan: render order, ETA and window, and the night's code run in a
simulated world (benchmarks/night_sim.py: virtual clock, anchors' times) under real Prefect.
The real LLM + Prefect end to end (LLM started once, crash, --until) is in test_batch.py."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from benchmarks.night_sim import SimNight, World, run_mode, sim_settings
from flows.night import NightOptions, parse_until, run_night
from resource_broker.schedule import IdeaPlan, WorkItem, fit_window, predict, render_order
from resource_broker.time_model import EngineProfile, TimeModel
from story_to_video.batch import parse_batch_text
from story_to_video.cli import app
from story_to_video.run import InputError

WAN = EngineProfile("comfyui", "wan2.2-14b", (2, 2))


def items(idea: int, n: int, deps: dict[int, int] | None = None) -> list[WorkItem]:
    return [WorkItem(idea, f"s01_sh{i + 1:02d}", 81, 832, 480,
                     (f"s01_sh{deps[i] + 1:02d}",) if deps and i in deps else ())
            for i in range(n)]


def test_clip_by_clip_goes_idea_by_idea_and_respects_chains() -> None:
    its = [*items(0, 3, {0: 2}), *items(1, 2)]  # shot 1 of idea 0 starts from shot 3
    groups = render_order(its, pass_major=False, seconds=lambda g: 1.0)
    assert [g.items[0].key for g in groups] == ["0/s01_sh02", "0/s01_sh03", "0/s01_sh01",
                                                "1/s01_sh01", "1/s01_sh02"]


def test_pass_major_packs_whole_ideas_and_chains_go_to_later_groups() -> None:
    its = [*items(0, 2), *items(1, 2, {1: 0}), *items(2, 2), *items(3, 2)]
    groups = render_order(its, pass_major=True, seconds=lambda g: 100.0 * len(g),
                          pack_s=500)
    keys = [[it.key for it in g.items] for g in groups]
    # ideas 0-2 fill the first pack (600 s >= 500 s closes it); shot 2 of idea 1 waits for
    # shot 1 in a group of its own; idea 3 starts the next pack
    assert keys == [["0/s01_sh01", "0/s01_sh02", "1/s01_sh01", "2/s01_sh01", "2/s01_sh02"],
                    ["1/s01_sh02"], ["3/s01_sh01", "3/s01_sh02"]]
    assert [g.pass_major for g in groups] == [True, False, True]


def plans(n: int, shots: int = 4) -> list[IdeaPlan]:
    return [IdeaPlan(i, f"idea {i}", WAN, items(i, shots), needs_plan=True)
            for i in range(n)]


def test_eta_plans_all_first_then_renders_and_assembles_each_idea_when_done() -> None:
    tm = TimeModel()
    eta = predict(plans(3), tm, pack_s=1.0)  # one idea per pack
    assert eta.stages["llm_load"] == tm.llm_load_s  # one LLM load for the whole night
    assert eta.stages["plan"] == pytest.approx(3 * tm.plan_seconds(), abs=0.1)
    assert eta.loads == 3 and eta.groups == 3
    finishes = [row.finish_s for row in eta.ideas]
    assert finishes == sorted(finishes) and finishes[-1] == eta.total_s
    first_render = eta.stages["llm_load"] + eta.stages["plan"]
    one = sum(tm.group_seconds(WAN, [it.shape for it in items(0, 4)]).values())
    assert finishes[0] == pytest.approx(first_render + one + tm.assemble_seconds(324), abs=0.2)
    # packing all three ideas into one pass-major group loads the models once, not 3 times
    assert predict(plans(3), tm).loads == 1
    assert predict(plans(3), tm).total_s < eta.total_s


def test_eta_makes_every_keyframe_before_the_render_and_learns_their_time() -> None:
    from dataclasses import replace

    tm = TimeModel()
    plain = predict(plans(2), tm)
    keyed = [IdeaPlan(p.index, p.label, p.profile,
                      [replace(it, keyframe=n % 2 == 0) for n, it in enumerate(p.items)],
                      needs_plan=True) for p in plans(2)]
    eta = predict(keyed, tm)
    one_set = tm.keyframe_seconds(WAN, [(1, 832, 480)] * 4)  # 2 keyframes per idea
    assert eta.stages["keyframes"] == pytest.approx(one_set, abs=0.1)
    assert one_set > tm.load_seconds(WAN)  # one set of loads, then a frame each
    assert eta.total_s == pytest.approx(plain.total_s + one_set, abs=0.2)
    assert eta.ideas[0].finish_s == pytest.approx(plain.ideas[0].finish_s + one_set, abs=0.2)
    # a shot already finished needs no keyframe
    keyed[0].done_items.add(keyed[0].items[0].key)
    assert predict(keyed, tm).stages["keyframes"] == pytest.approx(
        tm.keyframe_seconds(WAN, [(1, 832, 480)] * 3), abs=0.1)
    # what the night measured corrects the next ETA
    tm.refine("keyframes", one_set, 2 * one_set, weight=1.0)
    assert tm.keyframe_seconds(WAN, [(1, 832, 480)] * 4) == pytest.approx(2 * one_set)


def test_window_schedules_what_fits_and_says_by_how_much_nothing_does() -> None:
    tm = TimeModel()
    full = predict(plans(3), tm, pack_s=1.0)
    chosen, eta = fit_window(plans(3), tm, full.ideas[1].finish_s + 1, pack_s=1.0)
    assert [p.index for p in chosen] == [0, 1] and eta.left == [2]
    assert eta.total_s <= full.ideas[1].finish_s + 1
    chosen, eta = fit_window(plans(3), tm, 30.0, pack_s=1.0)
    assert chosen == [] and eta.left == [0, 1, 2]
    alone = predict(plans(1), tm, pack_s=1.0).total_s  # planning only itself
    assert eta.short_by_s == pytest.approx(alone - 30.0, abs=0.2)


def test_time_model_learns_and_keeps_what_it_learnt(tmp_path: Path) -> None:
    tm = TimeModel()
    before = sum(tm.group_seconds(WAN, [(81, 832, 480)]).values())
    for _ in range(6):  # this machine renders twice as slowly as the anchors say
        tm.refine("render", sum(tm.group_seconds(WAN, [(81, 832, 480)]).values()),
                  2 * before)
    assert sum(tm.group_seconds(WAN, [(81, 832, 480)]).values()) == pytest.approx(
        2 * before, rel=0.05)
    tm.save(tmp_path / "t.json")
    raw = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**raw, "from_the_future": 1}))
    assert TimeModel.load(tmp_path / "t.json").scale == tm.scale
    # the anchors' step times: 2.02 s at 81 frames, 6.95 s at 161 (ComfyUI on an H100)
    assert TimeModel().step_seconds("wan2.2-14b", 81, 832, 480) == pytest.approx(2.02, 0.01)
    assert TimeModel().step_seconds("wan2.2-14b", 161, 832, 480) == pytest.approx(6.95, 0.01)


def test_until_is_local_and_past_times_mean_tomorrow() -> None:
    now = datetime(2026, 3, 1, 23, 30).timestamp()
    assert datetime.fromtimestamp(parse_until("06:30", now)) == datetime(2026, 3, 2, 6, 30)
    assert datetime.fromtimestamp(parse_until("23:45", now)) == datetime(2026, 3, 1, 23, 45)
    with pytest.raises(InputError, match="HH:MM"):
        parse_until("6.30", now)


@pytest.fixture
def untouchable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any LLM server start or GPU reading fails the test."""
    import resource_broker.gpu
    from story_to_video.llm import embedded

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the dry run touched the LLM or the GPU")

    monkeypatch.setattr(embedded.LLMServer, "start", boom)
    monkeypatch.setattr(resource_broker.gpu, "open_monitor", boom)
    monkeypatch.setattr("openai.OpenAI.__init__", boom)


def test_dry_run_prints_the_eta_without_touching_llm_or_gpu(tmp_path: Path,
                                                           untouchable: None) -> None:
    batch = tmp_path / "night.jsonl"
    batch.write_text('{"idea": "a fox finds a lantern"}\n{"idea": "a whale sings", '
                     '"scenes": 2}\n')
    cfg = tmp_path / "s.toml"
    cfg.write_text('engine = "comfyui"\n[comfyui]\nworkflow = "wan22_14b_t2v"\n')
    r = CliRunner().invoke(app, ["batch", str(batch), "--dry-run", "--config", str(cfg),
                                 "--output", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].startswith("ETA: llm load 20 s, plan 1 min, llm moves 0 s, render ")
    assert "line 1: a fox finds a lantern: 6 shots (estimated before planning)" in r.output
    assert "line 2: a whale sings: 4 shots" in r.output
    assert lines[-1].startswith("predicted finish ")
    assert not (tmp_path / "runs").exists()  # nothing written either
    r = CliRunner().invoke(app, ["batch", str(batch), "--dry-run", "--config", str(cfg),
                                 "--until",
                                 (datetime.now() + timedelta(minutes=1)).strftime("%H:%M")])
    # the window closes within a minute: nothing fits, and the ETA says by how much
    assert r.exit_code == 2
    assert "error: the batch cannot fit the window: its first idea alone needs" in r.output
    assert "left for the next night: 2 idea(s)" in r.output


# -- the night's code in a simulated world ----------------------------------------------------

@pytest.fixture
def in_flow(prefect_harness: None) -> Iterator[None]:
    yield


def night(env: SimNight, out: Path, lines: list[str], **opts: object) -> dict[str, Any]:
    from prefect import flow

    @flow(name="test-night")
    def f() -> dict[str, Any]:
        parsed = parse_batch_text("\n".join(json.dumps({"idea": t}) for t in lines), "jsonl")
        result, eta = run_night(parsed, 2, 8.0, sim_settings(out, env.w.truth),
                                NightOptions(name="t", out_dir=out, **opts),  # type: ignore[arg-type]
                                env)
        return {**result, "eta_total_s": eta.total_s}

    return f()


def test_stage_by_stage_loads_the_llm_and_experts_once(in_flow: None, tmp_path: Path) -> None:
    from prefect import flow

    @flow(name="test-modes")
    def both() -> tuple[dict[str, object], dict[str, object]]:
        return (run_mode(3, False, tmp_path / "a"), run_mode(3, True, tmp_path / "b"))

    idea_by_idea, stage_by_stage = both()
    assert idea_by_idea["videos"] == stage_by_stage["videos"] == 3
    assert (idea_by_idea["llm_loads"], stage_by_stage["llm_loads"]) == (3, 1)
    disk_a, disk_b = idea_by_idea["loads_from_disk"], stage_by_stage["loads_from_disk"]
    assert isinstance(disk_a, dict) and isinstance(disk_b, dict)
    assert (disk_a["high"], disk_b["high"]) == (3, 1)
    assert stage_by_stage["total_s"] < idea_by_idea["total_s"]  # type: ignore[operator]
    assert stage_by_stage["gpu_idle_s"] < idea_by_idea["gpu_idle_s"]  # type: ignore[operator]


def test_window_stops_new_shots_and_the_next_night_resumes(in_flow: None,
                                                           tmp_path: Path) -> None:
    world = World(rng=random.Random(3))
    env = SimNight(world)
    ideas = ["a fox finds a lantern", "a whale sings", "a kite over dunes"]
    eta = night(env, tmp_path, ideas, dry_run=True, pack_s=1.0)["eta_total_s"]
    world.truth.disk_gib_per_s = 0.25  # a disk ten times slower than the model thinks
    first = night(env, tmp_path, ideas, until=1.1 * eta, pack_s=1.0)
    # the ETA said all three fit; the slow loads overran, so the night stopped starting
    # shots and left the rest for the next night
    assert first["eta"]["left"] == []
    assert first["done"] and first["left"]
    assert len(first["done"]) + len(first["left"]) == 3
    records = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/clips/*.json")}
    world.truth.disk_gib_per_s = 2.5
    second = night(env, tmp_path, ideas)
    assert len(second["done"]) == 3 and not second["left"]
    for p, mtime in records.items():
        assert p.stat().st_mtime_ns == mtime  # finished shots were not redone


def test_a_failed_plan_and_an_unanswered_unload_stop_nothing(in_flow: None,
                                                             tmp_path: Path) -> None:
    world = World(rng=random.Random(5), fail_unload=True)
    env = SimNight(world)
    ideas = ["a fox finds a lantern", "BROKEN idea that never plans", "a whale sings"]
    result = night(env, tmp_path, ideas)
    assert [d["idea"] for d in result["done"]] == ["a fox finds a lantern", "a whale sings"]
    (failed,) = result["failed"]
    assert failed["idea"] == "BROKEN idea that never plans"
    assert failed["reason"].startswith("PlanningError")
    assert world.loads.get("llm", 0) == 0  # never unloaded, never reloaded
    broker = env.engine_.broker
    assert broker is not None
    (moved,) = [e for e in broker.events if e.stage == "llm" and e.action != "restore"]
    assert "counted as taken" in moved.outcome
    # every shot after it was planned with the LLM's 14 GiB counted as taken
    assert broker.plan(81, 832, 480).decision("llm").action == "uncontrolled"


