"""Batches: parsing with line numbers, and a killed batch resumed without redoing work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from story_to_video.batch import BatchFileError, load_batch, parse_batch_text
from story_to_video.models import ShotPlan
from tests.conftest import ROOT


def test_broken_lines_are_reported_and_the_rest_kept() -> None:
    text = ('{"idea": "a fox"}\n'
            '{"idea": "a whale", "scenes": 0}\n'
            '\n'
            'not json\n'
            '# a comment\n'
            '{"idea": "a fox", "colour": "red"}\n'
            '"just a string idea"\n')
    parsed = parse_batch_text(text, "jsonl")
    assert [(w, e.idea) for w, e in parsed.entries] == [("line 1", "a fox"),
                                                         ("line 7", "just a string idea")]
    assert [(p.where, p.reason) for p in parsed.problems] == [
        ("line 2", "scenes: Input should be greater than or equal to 1"),
        ("line 4", "not JSON: Expecting value"),
        ("line 6", "colour: Extra inputs are not permitted"),
    ]


def test_toml_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text('[[ideas]]\nidea = "a fox"\nscenes = 2\n')
    (tmp_path / "b.yaml").write_text("- idea: a fox\n- a whale\n- {idea: ''}\n")
    assert load_batch(tmp_path / "b.toml").entries[0][1].scenes == 2
    y = load_batch(tmp_path / "b.yaml")
    assert [e.idea for _, e in y.entries] == ["a fox", "a whale"]
    assert y.problems[0].where == "entry 3"
    (tmp_path / "x.csv").write_text("idea\n")
    with pytest.raises(BatchFileError, match="use .jsonl, .toml, .yaml"):
        load_batch(tmp_path / "x.csv")
    (tmp_path / "bad.yaml").write_text("ideas: [\n")
    with pytest.raises(BatchFileError, match="not valid YAML"):
        load_batch(tmp_path / "bad.yaml")


def test_prefect_yaml_cron_is_valid() -> None:
    import yaml
    from cronsim import CronSim, CronSimError

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    crons = [s["cron"] for d in spec["deployments"] for s in d.get("schedules", [])]
    assert crons == ["0 1 * * *"]
    from datetime import datetime
    for c in crons:
        CronSim(c, datetime(2026, 1, 1))
    with pytest.raises(CronSimError):
        CronSim("0 25 * * *", datetime(2026, 1, 1))


def batch_cmd(file: Path, out: Path, home: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "STV_LLM__MAX_REPAIR_TRIES": "5"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "story_to_video", "batch", str(file), "--output", str(out),
         "--scenes", "2", "--target-seconds", "8", *extra], cwd=out.parent, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(Path(stdout.strip().splitlines()[-1]).read_text()), stderr


@pytest.mark.slow
def test_night_plans_once_keeps_finished_videos_leaves_what_does_not_fit_and_resumes(
        tmp_path: Path) -> None:
    """Real embedded LLM, real Prefect, the CLI: one night of two ideas."""
    file = tmp_path / "b.jsonl"
    file.write_text('{"idea": "a lighthouse in fog"}\n{"idea": "a kite over dunes"}\n')
    out = tmp_path / "runs"
    out.mkdir()
    proc = batch_cmd(file, out, tmp_path / "home1")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(out.glob("*/final.mp4")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker dies mid-night, as at 4 a.m.
    _stdout, stderr = proc.communicate()
    # stage by stage: the LLM started once and planned both ideas before any shot
    assert stderr.count("starting LLM server") == 1
    plans = list(out.glob("*/plan.json"))
    records = list(out.glob("*/clips/*.json"))
    assert len(plans) == 2
    assert max(p.stat().st_mtime for p in plans) <= min(r.stat().st_mtime for r in records)
    # the first idea's video was assembled as soon as its shots were done, while the other
    # idea still had shots to render
    (final,) = list(out.glob("*/final.mp4"))
    shots = {p.parent.name: len(ShotPlan.model_validate_json(p.read_text()).shots)
             for p in plans}
    done = {p.parent.name: len(list(p.parent.glob("clips/*.json"))) for p in plans}
    assert done[final.parent.name] == shots[final.parent.name]
    other = next(n for n in shots if n != final.parent.name)
    assert done[other] < shots[other]
    before = {p: p.stat().st_mtime_ns for p in records}

    # the next night has a window: with these speeds the unfinished idea cannot fit
    (out / ".time-model.json").write_text(json.dumps({"preview_s_per_frame": 100.0}))
    until = (datetime.now() + timedelta(minutes=65)).strftime("%H:%M")
    summary, stderr = finished(batch_cmd(file, out, tmp_path / "home2", "--until", until))
    assert "starting LLM server" not in stderr  # plans are reused: no LLM needed
    assert [d["idea"] for d in summary["done"]] == [
        json.loads(final.parent.joinpath("plan.json").read_text())["idea"]]
    (left,) = summary["left"]
    assert left["shots_done"] == done[other]
    assert "left line 2" in stderr or "left line 1" in stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/clips/*.json")} == before

    summary, _stderr = finished(batch_cmd(file, out, tmp_path / "home3"))
    assert len(summary["done"]) == 2 and not summary["failed"] and not summary["left"]
    for p, mtime in before.items():
        assert p.stat().st_mtime_ns == mtime  # finished shots were not redone
    assert not list(out.rglob("*.partial-*"))  # nothing half-written kept
    for fin in out.glob("*/final.mp4"):
        manifest = json.loads((fin.parent / "manifest.json").read_text())
        assert len(manifest["shots"]) == shots[fin.parent.name]


# Two workers sharing one batch (claims, no shot rendered twice): tests/test_workers.py,
# with real Prefect workers.
