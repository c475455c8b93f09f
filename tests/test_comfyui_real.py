"""The pipeline against a REAL ComfyUI 0.33 server (CPU, tiny random-weight Wan models).

The server is started once per session by scripts/comfyui_test_server.py from
../shared/comfyui (or $STV_COMFYUI_SRC); without a checkout these tests are skipped. Every
plan shares one prompt text, so the text encoder (about a minute per text on 2 cores) runs
once for the module; only the force_fresh test and the supervised-server test (restarts)
pay for it again, and they come last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import workflows
from story_to_video.engines.comfyui import (
    AttachedComfyUI,
    BoundWorkflow,
    ComfyUIClient,
    ComfyUIEngine,
    StallError,
)
from story_to_video.engines.video_io import probe
from story_to_video.llm.embedded import free_port
from tests.real_comfyui import (
    cli_call,
    manifest,
    model_loads,
    run_cli,
    seed_plan,
    tool,
)

# The first test pays for starting the server and the text encodes (minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.comfyui_real, pytest.mark.timeout(1800)]


def assert_ok(res: Any) -> Path:
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    return Path(res.stdout.strip().splitlines()[-1])


def one_error(res: Any) -> str:
    """The run failed with exactly one clear `error:` line."""
    errors: list[str] = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def history_prompt(url: str, prompt_id: str) -> dict[str, Any]:
    entry = httpx.get(f"{url}/history/{prompt_id}").json()[prompt_id]
    prompt: dict[str, Any] = entry["prompt"][2]
    return prompt


def test_t2v_14b_clip_by_clip(real_comfyui: Any, tmp_path: Path) -> None:
    folder = seed_plan(tmp_path, "real t2v clip by clip", [2])
    final = assert_ok(run_cli(folder, real_comfyui.url,
                              env={"STV_COMFYUI__WORKFLOW": "wan22_14b_t2v"}))
    m = manifest(folder)
    assert probe(final).frames == 18 and (probe(final).width, probe(final).height) == (128, 128)
    for rec in m["shots"]:
        assert rec["engine"] == "comfyui" and not rec["preview"]
        assert list(rec["details"]["stage_seconds"]) == ["all"]  # one prompt per shot
        clip = probe(folder.clips / rec["clip"])
        assert (clip.frames, clip.width, clip.height) == (9, 128, 128)
    # the two shots differ only in seed: both samplers ran for each, nothing from the cache
    assert [r["cached"] for r in m["shots"]] == [False, False]
    for rec in m["shots"]:
        assert {"81", "78"} <= set(rec["details"]["node_seconds"])
        assert not {"81", "78"} & set(rec["details"]["cached_nodes"])
    # a CPU server: the broker leaves memory to ComfyUI and says why, and no RAM is
    # plotted as VRAM
    decisions = [e for e in m["broker_events"] if e["stage"] == "experts"]
    assert decisions and all(e["action"] == "one-prompt" for e in decisions)
    assert "ComfyUI runs on the CPU" in decisions[0]["reason"]
    assert not (folder.root / "vram-timeline.png").exists()


def test_t2v_staged_with_forced_tiled_decode(real_comfyui: Any, tmp_path: Path) -> None:
    folder = seed_plan(tmp_path, "real t2v staged", [1], seed=11)
    assert_ok(run_cli(folder, real_comfyui.url, env={
        "STV_COMFYUI__WORKFLOW": "wan22_14b_t2v", "STV_BROKER__STRATEGY": "staged",
        "STV_COMFYUI__DECODE": "tiled"}))
    rec = manifest(folder)["shots"][0]
    d = rec["details"]
    assert list(d["stage_seconds"]) == ["high", "low", "decode"]
    assert (probe(folder.clips / rec["clip"]).frames, rec["width"]) == (9, 128)
    # stages share their work: the text encoder ran in no later stage (it was cached)
    low = history_prompt(real_comfyui.url, d["prompt_ids"]["low"])
    encoders = {n for n, v in low.items() if v["class_type"] == "CLIPTextEncode"}
    assert encoders and encoders <= set(d["cached_nodes"])
    decode = history_prompt(real_comfyui.url, d["prompt_ids"]["decode"])
    assert not any(v["class_type"] == "CLIPTextEncode" for v in decode.values())
    tiled = decode[workflows_decode_node()]
    assert tiled["class_type"] == "VAEDecodeTiled" and tiled["inputs"]["tile_size"] == 64
    # the handed-over latents were removed from ComfyUI's input and output folders
    work = real_comfyui.workdir
    assert not list((work / "input").glob("stv_*.latent"))
    # (only ours: the contract tests sharing this server save latents of their own)
    assert not list((work / "output").rglob("stv-latents/**/*.latent"))
    assert not list((work / "output").glob("stv-latents/*.latent"))


def workflows_decode_node() -> str:
    return BoundWorkflow.load(workflows.binding_path("wan22_14b_t2v")).binding.nodes.decode


def test_pass_major_loads_each_expert_once(real_comfyui: Any, tmp_path: Path) -> None:
    ComfyUIClient(real_comfyui.url).free(unload_models=True)  # start with nothing loaded
    time.sleep(1.0)
    folder = seed_plan(tmp_path, "real pass major", [3], seed=21)
    before = len(model_loads(real_comfyui.log_text()))
    assert_ok(run_cli(folder, real_comfyui.url, env={
        "STV_COMFYUI__WORKFLOW": "wan22_14b_t2v", "STV_COMFYUI__PASS_MAJOR": "true"}))
    loads = model_loads(real_comfyui.log_text())[before:]
    assert loads.count("WAN21") == 2, loads  # high expert once, low expert once
    shots = manifest(folder)["shots"]
    assert len(shots) == 3 and all(s["details"]["pass_major"] for s in shots)
    for s in shots:
        assert list(s["details"]["stage_seconds"]) == ["high", "low", "decode"]
        # each shot's own prompts, not the batch's seconds
        assert s["seconds"] == pytest.approx(sum(s["details"]["stage_seconds"].values()),
                                             abs=0.05)
        clip = probe(folder.clips / s["clip"])
        assert (clip.frames, clip.width, clip.height) == (9, 128, 128)
    assert len({s["seconds"] for s in shots}) > 1


def test_ti2v_5b(real_comfyui: Any, tmp_path: Path) -> None:
    folder = seed_plan(tmp_path, "real ti2v 5b", [1], frames=9, fps=24, seed=31)
    final = assert_ok(run_cli(folder, real_comfyui.url,
                              env={"STV_COMFYUI__WORKFLOW": "wan22_ti2v_5b"}))
    info = probe(final)
    assert (info.frames, info.width, info.height, info.fps) == (9, 128, 128, 24.0)


def test_i2v_refused_before_any_work_without_start_image(real_comfyui: Any,
                                                         tmp_path: Path) -> None:
    folder = seed_plan(tmp_path, "real i2v without image", [1])
    before = model_loads(real_comfyui.log_text())
    res = run_cli(folder, real_comfyui.url, env={"STV_COMFYUI__WORKFLOW": "wan22_14b_i2v"})
    assert one_error(res).startswith(
        "error: workflow wan22_14b_i2v.json starts every clip from an image, but shot "
        "s01_sh01 has no start image")
    assert model_loads(real_comfyui.log_text()) == before  # nothing was loaded or run
    assert not list(folder.clips.glob("*.mp4"))


def test_i2v_renders_from_a_start_image(real_comfyui: Any, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    Image.new("RGB", (160, 120), (200, 40, 40)).save(image)
    folder = seed_plan(tmp_path, "real i2v with image", [1], seed=41, start_image=str(image))
    assert_ok(run_cli(folder, real_comfyui.url, env={"STV_COMFYUI__WORKFLOW":
                                                     "wan22_14b_i2v"}))
    rec = manifest(folder)["shots"][0]
    assert probe(folder.clips / rec["clip"]).frames == 9
    sent = history_prompt(real_comfyui.url, rec["details"]["prompt_id"])
    name = sent["97"]["inputs"]["image"]
    assert name.startswith("story-to-video/stv_start_") and name.endswith(".png")
    # the 160x120 image, scaled and cropped to the shot's 128x128, is what ComfyUI got
    fitted = folder.root / rec["start_image"]
    assert Image.open(fitted).size == (128, 128)
    assert (real_comfyui.workdir / "input" / name).read_bytes() == fitted.read_bytes()


def test_preflight_refuses_missing_model_class_and_input(real_comfyui: Any,
                                                         tmp_path: Path) -> None:
    src = workflows.binding_path("wan22_14b_t2v")
    wf = json.loads((src.parent / "wan22_14b_t2v.json").read_text())

    def binding_for(name: str, mutate: Any, binding_edit: Any = None) -> Path:
        w = json.loads(json.dumps(wf))
        mutate(w)
        (tmp_path / f"{name}.json").write_text(json.dumps(w))
        text = src.read_text().replace('"wan22_14b_t2v.json"', f'"{name}.json"')
        out = tmp_path / f"{name}.binding.toml"
        out.write_text(binding_edit(text) if binding_edit else text)
        return out

    missing_model = binding_for("nomodel", lambda w: w["75"]["inputs"].update(
        unet_name="wan2.2_t2v_high_noise_14B_fp16.safetensors"))
    folder = seed_plan(tmp_path, "real preflight", [1])
    before = model_loads(real_comfyui.log_text())
    res = run_cli(folder, real_comfyui.url, env={"STV_COMFYUI__BINDING": str(missing_model)})
    err = one_error(res)
    assert "node 75 (UNETLoader): unet_name='wan2.2_t2v_high_noise_14B_fp16.safetensors' is " \
           "not available; ComfyUI has: " in err, err
    assert model_loads(real_comfyui.log_text()) == before

    def check(binding: Path) -> subprocess.CompletedProcess[str]:
        wf_file = binding.with_name(binding.name.removesuffix(".binding.toml") + ".json")
        return subprocess.run(
            ["story-to-video", "workflows", "check", str(wf_file), "--binding", str(binding),
             "--comfyui-url", real_comfyui.url], capture_output=True, text=True, check=False,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})

    no_class = check(binding_for("noclass", lambda w: w["82"].update(
        class_type="WanVideoBlockSwap")))
    assert no_class.returncode == 1
    assert "problem: node 82: class 'WanVideoBlockSwap' is not installed in ComfyUI " \
           "(missing custom node?)" in no_class.stderr
    no_input = check(binding_for("noinput", lambda w: w["88"]["inputs"].update(frame_rate=16),
                                 lambda t: t.replace('fps = ["88", "fps"]',
                                                     'fps = ["88", "frame_rate"]')))
    assert no_input.returncode == 1
    assert "problem: node 88 (CreateVideo) has no input 'frame_rate' in this ComfyUI" \
        in no_input.stderr
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    (tmp_path / "ui.binding.toml").write_text(src.read_text().replace(
        '"wan22_14b_t2v.json"', '"ui.json"'))
    ui_res = check(tmp_path / "ui.binding.toml")
    assert ui_res.returncode == 2 and "UI-format workflow" in ui_res.stderr
    assert "Export (API)" in ui_res.stderr


def test_stalled_server_trips_the_watchdog(real_comfyui: Any, tmp_path: Path) -> None:
    """A real server made to hang (SIGSTOP right after it accepted the prompt)."""
    from tests.real_comfyui import make_shot

    engine = ComfyUIEngine(ComfyUIClient(real_comfyui.url),
                           BoundWorkflow.load(workflows.binding_path("wan22_14b_t2v")),
                           AttachedComfyUI(real_comfyui.url), stall_timeout_s=4.0)
    submit = engine.client.submit

    def submit_then_stop(prompt: dict[str, Any]) -> str:
        pid = submit(prompt)
        os.kill(real_comfyui.pid, signal.SIGSTOP)
        return pid

    engine.client.submit = submit_then_stop  # type: ignore[method-assign]
    engine.client.http.timeout = httpx.Timeout(3.0)  # the interrupt cannot be answered
    started = time.monotonic()
    try:
        with pytest.raises(StallError, match="no progress for 4s; interrupted"):
            engine.render(make_shot(0, 0, seed=51), tmp_path / "c.mp4")
    finally:
        os.kill(real_comfyui.pid, signal.SIGCONT)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "c.mp4").exists()
    deadline = time.monotonic() + 120  # the server comes back and answers again
    while not tool().answers(real_comfyui.url):
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_cached_rerun_and_force_fresh(real_comfyui: Any, tmp_path: Path) -> None:
    env = {"STV_COMFYUI__WORKFLOW": "wan22_14b_t2v"}
    first = seed_plan(tmp_path / "a", "real cache a", [1], seed=61)
    assert_ok(run_cli(first, real_comfyui.url, env=env))
    again = seed_plan(tmp_path / "b", "real cache b", [1], seed=61)  # the same shot
    assert_ok(run_cli(again, real_comfyui.url, env=env))
    fresh = seed_plan(tmp_path / "c", "real cache c", [1], seed=61)
    assert_ok(run_cli(fresh, real_comfyui.url, env={**env, "STV_COMFYUI__FORCE_FRESH": "1"}))
    cached = [manifest(f)["shots"][0]["cached"] for f in (first, again, fresh)]
    assert cached == [False, True, False]
    assert probe(again.clips / manifest(again)["shots"][0]["clip"]).frames == 9
    report = (again.root / "report.md").read_text()
    assert "cached" in report


def test_supervised_server_killed_mid_shot_and_restarted_between_scenes(
        tmp_path: Path) -> None:
    """The project starts ComfyUI itself: SIGKILL during the first shot -> restarted and
    retried to a good clip; restart_every_n_scenes = 1 restarts it between the two scenes,
    on a machine without NVML."""
    t = tool()
    src = t.source_dir()
    if not (src / "main.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {src}")
    port = free_port()
    cmd = t.command(t.prepare(src), port, tmp_path / "comfy")
    folder = seed_plan(tmp_path, "real supervised", [1, 1], seed=71)
    proc = run_cli_background(folder, f"http://127.0.0.1:{port}", {
        "STV_COMFYUI__WORKFLOW": "wan22_14b_t2v", "STV_COMFYUI__COMMAND": json.dumps(cmd),
        "STV_BROKER__RESTART_EVERY_N_SCENES": "1"})
    log = folder.root / "comfyui.log"
    deadline = time.monotonic() + 600
    while "got prompt" not in (log.read_text(errors="replace") if log.is_file() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    killed = comfyui_pid(port)
    os.kill(killed, signal.SIGKILL)
    _out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-4000:]
    m = manifest(folder)
    assert [probe(folder.clips / s["clip"]).frames for s in m["shots"]] == [9, 9]
    restarts = [e for e in m["broker_events"] if e["stage"] == "restart"]
    assert [e["action"] for e in restarts] == ["restart-comfyui"]
    assert restarts[0]["reason"] == "scheduled: every 1 scene(s)"
    text = log.read_text(errors="replace")
    assert text.count("Starting server") == 3  # first start, after the kill, scheduled
    assert "restarting ComfyUI and retrying" in err


def run_cli_background(folder: Any, url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    args, full_env = cli_call(folder, url, env)
    return subprocess.Popen(args, env=full_env, cwd=folder.spec.output_dir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def comfyui_pid(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", "--", f"--port {port} "], capture_output=True, text=True,
                         check=False).stdout.split()
    assert out, f"no ComfyUI process on port {port}"
    return int(out[0])
