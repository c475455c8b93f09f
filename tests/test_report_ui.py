"""What the report and the UI show, without servers: names, keys, tables, links, the media
server (Starlette's TestClient, in process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from story_to_video.cli import app
from story_to_video.config import VideoSettings
from story_to_video.models import ShotPlan
from story_to_video.planner import Planner, plan_from_story
from story_to_video.report import DiskLinks, UILinks, render_markdown, vram_rows, write_report
from story_to_video.serve import media_app
from story_to_video.ui import artifact_key, key_words, run_slug, run_title
from tests.fakes import ScriptedLLM, bible_json, scenes_json

LONG = ("a paper boat sails through a flooded city at dawn while the bells of every drowned "
        "church ring out")


def make_plan(scenes: int = 2) -> ShotPlan:
    planner = Planner(ScriptedLLM([bible_json(), scenes_json(scenes, 1)]))
    return plan_from_story(planner, idea="a whale sings", story="A whale sings.",
                           style="cinematic", scenes=scenes, target_seconds=10,
                           video=VideoSettings())


def record(plan: ShotPlan, i: int, vram: dict[str, Any] | None = None) -> dict[str, Any]:
    s = plan.shots[i]
    details: dict[str, Any] = {"stage_seconds": {"high": 1.5, "low": 1.25, "decode": 0.5}}
    if vram is not None:
        details["vram"] = vram
    return {"shot_id": s.id, "clip": f"{s.id}-abc.mp4", "frames": s.frames, "fps": s.fps,
            "seconds": 0.512, "cached": False, "resumed": False, "details": details}


def test_names_and_keys_keep_whole_words() -> None:
    title = run_title(LONG)
    assert title == "a paper boat sails through a flooded city at dawn while the..."
    assert run_title("  a   fox\n finds a lantern ") == "a fox finds a lantern"
    assert key_words(LONG) == "a-paper-boat-sails-through-a-flooded-city-at"
    assert key_words("Ünïcode café, déjà vu!") == "unicode-cafe-deja-vu"
    assert key_words("x" * 90) == "x" * 48  # one word longer than the limit: cut, not empty
    assert key_words("!!!") == "run"
    # stable across resumes: the same inputs give the same key
    assert run_slug(LONG, None, "6D51CC33") == run_slug(LONG, None, "6d51cc33") == \
        "a-paper-boat-sails-through-a-flooded-city-at-6d51cc33"
    assert run_slug(LONG, "Night One", "6d51cc33") == "night-one"
    assert artifact_key("report", "night-one") == "report-night-one"


def test_vram_rows_are_blank_where_nothing_was_measured() -> None:
    plan = make_plan()
    rows = vram_rows([record(plan, 0), record(plan, 1, {
        "predicted_peak_gib": 19.417, "actions": [{"action": "unload-high-before-low"},
                                                  {"action": "decode-full"},
                                                  {"action": "decode-full"}]})])
    assert rows[0] == {"shot": "s01_sh01", "predicted peak GiB": "", "measured peak GiB": "",
                       "min free GiB": "", "broker actions": "", "render s": "0.51"}
    assert rows[1]["predicted peak GiB"] == "19.42"
    # predicted but no reading (a shot shorter than the sampling interval): said, never 0.00
    assert (rows[1]["measured peak GiB"], rows[1]["min free GiB"]) == ("not measured",) * 2
    assert rows[1]["broker actions"] == "unload-high-before-low, decode-full"
    two = record(plan, 1, {"actions": [{"action": "a"}, {"action": "b"}]})
    assert vram_rows([two], sep="  \n")[0]["broker actions"] == "a  \nb"  # UI: one a line


def test_report_names_clip_length_and_render_time(tmp_path: Path) -> None:
    plan = make_plan()
    vram = {"predicted_peak_gib": 19.42, "measured_peak_gib": 18.5, "min_free_gib": 3.25,
            "actions": [{"action": "unload-high-before-low"}]}
    text = render_markdown(plan, [record(plan, 0, vram), record(plan, 1, vram)],
                           root=tmp_path, links=DiskLinks(), sheet=None, plot=None,
                           run_info={"engine": "comfyui", "preview": False,
                                     "llm": "llamacpp-embedded at http://127.0.0.1:4123/v1"})
    assert ("| shot | clip | clip length s | frames | fps | camera | render time s | note |"
            in text)
    shot = plan.shots[0]
    assert (f"| s01_sh01 | [s01_sh01-abc.mp4](clips/s01_sh01-abc.mp4) | "
            f"{shot.frames / shot.fps:.2f} | {shot.frames} | 16 |") in text
    assert "| 0.51 |" in text
    # a dead server's URL is shown as text, never as a link
    assert "LLM: `llamacpp-embedded at http://127.0.0.1:4123/v1`" in text
    assert f"(on disk: `{tmp_path / 'final.mp4'}`)" in text
    assert "| s01_sh01 | 19.42 | 18.50 | 3.25 | 0.51 |" in text
    assert "- s01_sh01: unload-high-before-low; high 1.5s, low 1.25s, decode 0.5s" in text
    assert "{}" not in text and "None" not in text


def test_ui_copy_inlines_images_and_links_videos_to_the_media_server(tmp_path: Path) -> None:
    from PIL import Image

    plan = make_plan()
    root = tmp_path / "a-whale-sings-1234abcd"
    root.mkdir()
    sheet, plot = root / "contact-sheet.png", root / "vram-timeline.png"
    Image.new("RGB", (480, 138), (200, 0, 0)).save(sheet)
    Image.new("RGB", (2000, 700), (0, 0, 200)).save(plot)
    text = render_markdown(plan, [record(plan, 0)], root=root,
                           links=UILinks("http://gpu-box:4300", root), sheet=sheet, plot=plot,
                           run_info={"engine": "preview", "preview": True, "llm": "x"})
    assert "![contact sheet](data:image/png;base64," in text  # flat colour: PNG is smaller
    assert "![VRAM timeline](data:image/png;base64," in text
    assert "[final.mp4](http://gpu-box:4300/a-whale-sings-1234abcd/final.mp4)" in text
    assert ("[s01_sh01-abc.mp4](http://gpu-box:4300/a-whale-sings-1234abcd/clips/"
            "s01_sh01-abc.mp4)") in text
    assert "Not measured: the preview engine does no GPU work." in text
    assert "| s02_sh01 | not rendered |" in text


def test_report_of_a_run_with_no_finished_shot(tmp_path: Path) -> None:
    plan = make_plan()
    out = write_report(tmp_path, plan, [], {"engine": "comfyui", "preview": False, "llm": "x"},
                       None, media_url="http://127.0.0.1:4300", slug="a-whale-sings-1",
                       failure="GpuOutOfMemory: out of memory in KSamplerAdvanced")
    text = out.read_text()
    assert "**Not finished**: 0 of 2 shots done. GpuOutOfMemory" in text
    assert "No shot finished, so there is no contact sheet yet." in text
    assert "final.mp4" not in text  # there is none to link
    assert text.count("| not rendered |") == 2
    assert not (tmp_path / "contact-sheet.png").exists()


@pytest.fixture()
def served(tmp_path: Path) -> tuple[TestClient, Path]:
    runs = tmp_path / "runs"
    (runs / "a-run" / "clips").mkdir(parents=True)
    (runs / "a-run" / "final.mp4").write_bytes(b"\x00" * 5000)
    (runs / "a-run" / "clips" / "s01.mp4").write_bytes(b"\x01" * 100)
    (runs / "a-run" / "clips" / "s01.claim").write_text("pid")
    (runs / "a-run" / ".secret.json").write_text("{}")
    (tmp_path / "outside.mp4").write_bytes(b"x")
    return TestClient(media_app([runs])), runs


def test_media_server_plays_and_seeks(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    r = client.get("/a-run/final.mp4")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert len(r.content) == 5000
    part = client.get("/a-run/final.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and len(part.content) == 100
    assert client.head("/a-run/clips/s01.mp4").headers["content-length"] == "100"
    listing = client.get("/a-run/").text
    assert "clips/s01.mp4" in listing and "claim" not in listing and "secret" not in listing
    assert "a-run" in client.get("/").text


def test_media_server_says_when_a_run_folder_moved(served: tuple[TestClient, Path]) -> None:
    client, runs = served
    (runs / "a-run").rename(runs.parent / "moved")
    r = client.get("/a-run/final.mp4")
    assert r.status_code == 404
    assert "moved or deleted after the run" in r.text and str(runs) in r.text


@pytest.mark.parametrize("path", ["/a-run/nothing.mp4", "/a-run/.secret.json",
                                  "/a-run/..%2F..%2Foutside.mp4", "/..%2Foutside.mp4"])
def test_media_server_serves_nothing_else(served: tuple[TestClient, Path], path: str) -> None:
    client, _ = served
    r = client.get(path)
    assert r.status_code == 404 and r.content != b"x"


def test_serve_refuses_a_missing_folder(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["serve", "--dir", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "is not a folder: give the folder that holds the run folders" in res.output


def test_inline_images_are_scaled_and_take_the_smaller_encoding(tmp_path: Path) -> None:
    import base64
    import io

    import numpy as np
    from PIL import Image

    from story_to_video.report import inline_image

    def decode(uri: str) -> tuple[str, Image.Image]:
        head, data = uri.split(",", 1)
        return head, Image.open(io.BytesIO(base64.b64decode(data)))

    flat, photo = tmp_path / "plot.png", tmp_path / "sheet.png"
    Image.new("RGB", (2000, 700), (255, 255, 255)).save(flat)
    noise = np.random.default_rng(0).normal(128, 40, (69, 96, 3)).clip(0, 255)
    Image.fromarray(noise.astype("uint8")).resize((960, 690), Image.BICUBIC).save(photo)
    head, img = decode(inline_image(flat))
    assert head == "data:image/png;base64" and img.size == (1200, 420)
    head, img = decode(inline_image(photo))
    assert head == "data:image/jpeg;base64" and img.size == (960, 690)
    assert len(inline_image(photo)) < photo.stat().st_size  # smaller than the PNG on disk
