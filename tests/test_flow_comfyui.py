"""The real flow with the comfyui engine against the fake ComfyUI, broker in no-GPU mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.pipeline import story_to_video
from story_to_video.engines.video_io import probe
from story_to_video.run import RunFolder, RunSpec
from tests.fake_comfyui import FakeComfyUI
from tests.fakes import ScriptedLLM, bible_json, scenes_json

pytestmark = pytest.mark.slow


@pytest.fixture()
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    server.faults.step_delay_s = 0.0
    yield server
    server.stop()


def seed_plan(out: Path, idea: str) -> RunFolder:
    """A plan already on disk: the flow resumes from it, so no LLM is needed here."""
    from story_to_video.config import VideoSettings
    from story_to_video.planner import Planner, plan_from_story

    folder = RunFolder(RunSpec(idea=idea, scenes=2, target_seconds=10, style="cinematic",
                               engine="comfyui", output_dir=out))
    folder.prepare()
    planner = Planner(ScriptedLLM([bible_json(), scenes_json(2, 1)]))
    folder.save_plan(plan_from_story(planner, idea=idea, story="s", style="cinematic",
                                     scenes=2, target_seconds=10, video=VideoSettings()))
    return folder


def test_comfyui_flow_staged_with_report(fake: FakeComfyUI, tmp_path: Path,
                                         prefect_harness: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake.argv.append("--disable-dynamic-vram")  # the classic loader: the broker plans
    monkeypatch.setenv("STV_COMFYUI__URL", fake.url)
    monkeypatch.setenv("STV_COMFYUI__WORKFLOW", "wan22_14b_t2v")
    folder = seed_plan(tmp_path, "a whale sings")
    final = Path(story_to_video(idea="a whale sings", scenes=2, target_seconds=10,
                                engine="comfyui", output_dir=str(tmp_path)))
    manifest = json.loads((final.parent / "manifest.json").read_text())
    shots = manifest["shots"]
    assert [s["engine"] for s in shots] == ["comfyui", "comfyui"]
    assert probe(final).frames == sum(s["frames"] for s in shots)
    # no GPU here (24 GiB assumed): on the classic loader both experts do not fit, so the
    # broker batched the two shots pass by pass, as measured to win (1.32x at 32 GiB)
    for s in shots:
        assert list(s["details"]["stage_seconds"]) == ["high", "low", "decode"]
        assert s["details"]["vram"]["predicted_peak_gib"] > 0
        assert s["details"]["pass_major"] is True
    events = manifest["broker_events"]
    batch = [e for e in events if e["stage"] == "batch"]
    assert batch[0]["action"] == "pass-major" and "classic loader" in batch[0]["reason"]
    report = (folder.root / "report.md").read_text()
    assert "## VRAM" in report and "one-prompt" in report
    assert (folder.root / "vram-timeline.png").is_file()  # sampled from /system_stats
    assert len(fake.prompts) == 6  # 3 stages x 2 shots


def test_comfyui_flow_pass_major(fake: FakeComfyUI, tmp_path: Path, prefect_harness: None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STV_COMFYUI__URL", fake.url)
    monkeypatch.setenv("STV_COMFYUI__PASS_MAJOR", "true")
    monkeypatch.setenv("STV_COMFYUI__WORKFLOW", "wan22_14b_t2v")
    seed_plan(tmp_path, "an owl at dusk")
    final = Path(story_to_video(idea="an owl at dusk", scenes=2, target_seconds=10,
                                engine="comfyui", output_dir=str(tmp_path)))
    manifest = json.loads((final.parent / "manifest.json").read_text())
    assert all(s["details"].get("pass_major") for s in manifest["shots"])
    assert len(fake.model_loads) == 2  # each expert once for the whole run
    assert probe(final).frames == sum(s["frames"] for s in manifest["shots"])
