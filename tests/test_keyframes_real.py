"""Start images against a REAL ComfyUI 0.33 (CPU, tiny random-weight Wan models).

Every shot here uses one prompt text, which is also its keyframe prompt (the plan's
action, setting and bible, as `keyframe_prompt` builds it), and the suite's NEGATIVE: the
server encodes one new text for this module (a minute or more on 2 cores) and answers the
rest from its cache. The tiny random VAE decodes near-constant grey, so "shot 2 starts from
shot 1's last frame" is proven pixel by pixel: the file ComfyUI received for shot 2 against
the last frame decoded from shot 1's clip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from story_to_video.engines.video_io import probe, read_frame
from story_to_video.models import ShotPlan
from story_to_video.run import RunFolder
from story_to_video.start_images import keyframe_prompt
from tests.real_comfyui import cli_call, manifest, run_cli, seed_plan

pytestmark = [pytest.mark.slow, pytest.mark.comfyui_real, pytest.mark.timeout(1800)]
FRAMES = 5  # the fewest Wan takes (4k+1); 128x128 is the smallest size a plan allows


def text_of(folder: RunFolder) -> str:
    plan = folder.load_plan()
    assert plan is not None
    return keyframe_prompt(plan, plan.shots[0])


def seeded(tmp_path: Path, idea: str, shots: list[int], **kw: Any) -> RunFolder:
    """A plan whose video prompt is its keyframe prompt: one text for the whole module."""
    probe_folder = seed_plan(tmp_path / "probe", "probe", [1])
    folder = seed_plan(tmp_path, idea, shots, frames=FRAMES, prompt=text_of(probe_folder),
                       **kw)
    plan = folder.load_plan()
    assert plan is not None and text_of(folder) == plan.shots[0].prompt
    return folder


def history(url: str, prompt_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = httpx.get(f"{url}/history/{prompt_id}").json()[prompt_id]
    return entry


def uploaded(server: Any, rec: dict[str, Any], node: str) -> Path:
    """The start image file ComfyUI loaded for this shot (its input folder)."""
    sent = history(server.url, rec["details"]["prompt_id"])["prompt"][2]
    return Path(server.workdir / "input" / sent[node]["inputs"]["image"])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def user_plan(tmp_path: Path, idea: str, shots: list[int], seed: int) -> tuple[RunFolder, Path]:
    """A plan whose first shot starts from a user image of another size (200x120)."""
    user = tmp_path / "keeper.png"
    Image.new("RGB", (200, 120), (200, 60, 30)).save(user)
    folder = seeded(tmp_path, idea, shots, seed=seed)
    plan = folder.load_plan()
    assert plan is not None
    plan.scenes[0].shots[0] = plan.scenes[0].shots[0].model_copy(
        update={"start_image": str(user)})
    folder.save_plan(ShotPlan.model_validate(plan.model_dump()))
    return folder, user


def test_chain_of_three_killed_after_shot_one_resumes_from_its_last_frame(
        real_comfyui: Any, tmp_path: Path) -> None:
    """Wan 2.2 14B I2V, video.start_images = chain: shot 1 starts from the user's image
    (scaled and cropped to the shot), shots 2 and 3 from the last frame of the clip before.
    The run is killed once shot 1 is finished; the re-run does not redo it."""
    folder, _user = user_plan(tmp_path, "real chain of three", [3], seed=81)
    env = {"STV_COMFYUI__WORKFLOW": "wan22_14b_i2v", "STV_VIDEO__START_IMAGES": "chain"}
    args, full_env = cli_call(folder, real_comfyui.url, env)
    proc = subprocess.Popen(args, env=full_env, cwd=folder.spec.output_dir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 1200
    while not list(folder.clips.glob("s01-sh01-*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # between shot 1 and shot 2
    proc.communicate()
    done = {p: p.stat().st_mtime_ns for p in folder.clips.glob("s01-sh01-*")}
    assert not list(folder.clips.glob("s01-sh03-*.json"))

    res = run_cli(folder, real_comfyui.url, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in folder.clips.glob("s01-sh01-*")} == done
    recs = {r["shot_id"]: r for r in manifest(folder)["shots"]}
    assert recs["s01_sh01"]["resumed"] and not recs["s01_sh03"]["resumed"]
    for r in recs.values():
        clip = probe(folder.clips / r["clip"])
        assert (clip.frames, clip.width, clip.height) == (FRAMES, 128, 128)
    # shot 1: the user's image, scaled and cropped to 128x128, is what ComfyUI loaded
    sent1 = uploaded(real_comfyui, recs["s01_sh01"], "97")
    assert pixels(sent1).shape == (128, 128, 3)
    assert np.array_equal(pixels(sent1), pixels(folder.root / recs["s01_sh01"]["start_image"]))
    # shots 2 and 3: exactly the last decoded frame of the clip before
    for prev, nxt in (("s01_sh01", "s01_sh02"), ("s01_sh02", "s01_sh03")):
        last = read_frame(folder.clips / recs[prev]["clip"], FRAMES - 1)
        assert np.array_equal(pixels(uploaded(real_comfyui, recs[nxt], "97")), last)
        assert recs[nxt]["start_image"].startswith(f"keyframes/{nxt.replace('_', '-')}-chain-")


def test_ti2v_5b_from_a_start_image(real_comfyui: Any, tmp_path: Path) -> None:
    """TI2V 5B takes an optional start image: given one, its LoadImage node feeds it."""
    folder, _user = user_plan(tmp_path, "real ti2v from image", [1], seed=85)
    res = run_cli(folder, real_comfyui.url, env={"STV_COMFYUI__WORKFLOW": "wan22_ti2v_5b"})
    assert res.returncode == 0, res.stderr[-4000:]
    rec = manifest(folder)["shots"][0]
    sent = history(real_comfyui.url, rec["details"]["prompt_id"])["prompt"][2]
    assert sent["55"]["inputs"]["start_image"] == ["56", 0]
    assert np.array_equal(pixels(uploaded(real_comfyui, rec, "56")),
                          pixels(folder.root / rec["start_image"]))
    assert probe(folder.clips / rec["clip"]).frames == FRAMES


def test_i2v_from_keyframes_rendered_first(real_comfyui: Any, tmp_path: Path) -> None:
    """Wan 2.2 14B I2V with video.start_images = keyframe: the shipped Wan 2.2 T2V
    length-1 keyframe workflow makes each shot's start image (a still at the shot's size),
    every keyframe before any clip, and the broker's keyframe plan is in the records."""
    folder = seeded(tmp_path, "real i2v from keyframes", [2], seed=91)
    res = run_cli(folder, real_comfyui.url, env={"STV_COMFYUI__WORKFLOW": "wan22_14b_i2v",
                                                  "STV_VIDEO__START_IMAGES": "keyframe"})
    assert res.returncode == 0, res.stderr[-4000:]
    m = manifest(folder)
    recs = {r["shot_id"]: r for r in m["shots"]}
    kf_records = [json.loads(p.read_text())
                  for p in sorted((folder.root / "keyframes").glob("*-kf-*.json"))]
    assert [k["shot_id"] for k in kf_records] == ["s01_sh01", "s01_sh02"]
    for kf in kf_records:
        still = folder.root / "keyframes" / kf["image"]
        assert Image.open(still).size == (128, 128)
        sent = history(real_comfyui.url, kf["details"]["prompt_id"])["prompt"][2]
        assert sent["74"]["inputs"]["length"] == 1 and sent["80"]["class_type"] == "SaveImage"
        assert sent["89"]["inputs"]["text"] == kf["prompt"]
        rec = recs[kf["shot_id"]]
        assert rec["start_image"] == f"keyframes/{kf['image']}"
        assert uploaded(real_comfyui, rec, "97").read_bytes() == still.read_bytes()
        assert probe(folder.clips / rec["clip"]).frames == FRAMES
    # every keyframe before any clip
    kf_done = max((folder.root / "keyframes" / k["image"]).stat().st_mtime for k in kf_records)
    assert kf_done <= min(r["started_at"] for r in recs.values())
    planned = [e for e in m["broker_events"] if e["stage"] == "keyframe"]
    assert len(planned) == 1 and planned[0]["action"].startswith("keyframes-first")
    assert planned[0]["params"]["model_loads"] == {"keyframes_first": 2, "interleaved": 4}
