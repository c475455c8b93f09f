"""The real flow, in Prefect, with the real embedded LLM server and the preview engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.pipeline import story_to_video
from story_to_video.engines.video_io import probe, stream_codec
from story_to_video.llm import LLMUnavailable
from story_to_video.llm.embedded import free_port
from story_to_video.run import InputError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _harness(prefect_harness: None) -> None:
    return None


def test_idea_to_final_mp4_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    final = Path(story_to_video(idea="a fox finds a lantern in the snow", scenes=2,
                                target_seconds=6, output_dir=str(out)))
    assert final.name == "final.mp4" and final.parent.parent == out
    manifest = json.loads((final.parent / "manifest.json").read_text())
    plan = manifest["plan"]
    shots = [s for sc in plan["scenes"] for s in sc["shots"]]
    assert len(plan["scenes"]) == 2
    assert len(manifest["shots"]) == len(shots) >= 2
    info = probe(final)
    assert info.frames == sum(s["frames"] for s in shots)
    assert info.fps == 16.0
    assert info.seconds == pytest.approx(sum(s["frames"] for s in shots) / 16, abs=1 / 16)
    assert stream_codec(final) == "h264"
    assert manifest["preview"] is True and manifest["engine"] == "preview"
    assert manifest["llm"].startswith("llamacpp-embedded at http://127.0.0.1:")
    assert manifest["prompt_version"].startswith("v1-")
    assert all(r["preview"] and not r["resumed"] for r in manifest["shots"])
    report = (final.parent / "report.md").read_text()
    assert "PREVIEW run" in report and "![contact sheet](contact-sheet.png)" in report
    assert all(f"| {s['id']} |" in report for s in shots)
    assert (final.parent / "contact-sheet.png").stat().st_size > 1000

    clips = sorted((final.parent / "clips").glob("*.mp4"))
    mtimes = {p: p.stat().st_mtime_ns for p in clips}
    again = Path(story_to_video(idea="a fox finds a lantern in the snow", scenes=2,
                                target_seconds=6, output_dir=str(out)))
    assert again == final
    manifest2 = json.loads((final.parent / "manifest.json").read_text())
    assert manifest2["llm"] == "reused plan"  # no LLM call on resume
    assert all(r["resumed"] for r in manifest2["shots"])
    assert {p: p.stat().st_mtime_ns for p in clips} == mtimes  # nothing re-rendered


def test_unreachable_llm_stops_before_any_work(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMUnavailable, match=f"cannot reach the LLM server at {url}"):
        story_to_video(idea="a fox", scenes=1, target_seconds=4, output_dir=str(tmp_path),
                       llm={"backend": "lmstudio", "base_url": url, "connect_retries": 0})
    assert not list(tmp_path.rglob("*.md")) and not list(tmp_path.rglob("*.mp4"))


@pytest.mark.parametrize(("kw", "err", "msg"), [
    ({"idea": ""}, InputError, "idea is empty"),
    ({"idea": "x", "scenes": 0}, InputError, "scenes must be between"),
])
def test_bad_input_stops_before_any_work(tmp_path: Path, kw: dict[str, object],
                                         err: type[Exception], msg: str) -> None:
    with pytest.raises(err, match=msg):
        story_to_video(output_dir=str(tmp_path), **kw)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
