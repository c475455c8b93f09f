"""The ComfyUI engine at the transport layer, against the fake server (real HTTP + WS)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workflows
from story_to_video.engines.base import Progress
from story_to_video.engines.comfyui import (
    AttachedComfyUI,
    BoundWorkflow,
    ComfyUIClient,
    ComfyUIDied,
    ComfyUIEngine,
    ComfyUIUnavailable,
    GpuOutOfMemory,
    PromptValidationError,
    RestartUnavailable,
    StallError,
    WorkflowError,
)
from story_to_video.engines.video_io import probe
from story_to_video.llm.embedded import free_port
from story_to_video.models import Shot
from tests.fake_comfyui import OBJECT_INFO, FakeComfyUI, Faults

T2V = workflows.binding_path("wan22_14b_t2v")


@pytest.fixture()
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


def shot(**kw: Any) -> Shot:
    base: dict[str, Any] = {"id": "s01_sh01", "scene_index": 0, "shot_index": 0,
                            "action": "a", "prompt": "a whale", "negative_prompt": "blurry",
                            "frames": 17, "fps": 16, "width": 128, "height": 128, "seed": 42}
    base.update(kw)
    return Shot(**base)


def engine(fake: FakeComfyUI, binding: Path = T2V, **kw: Any) -> ComfyUIEngine:
    return ComfyUIEngine(ComfyUIClient(fake.url), BoundWorkflow.load(binding),
                         AttachedComfyUI(fake.url), **kw)


def test_renders_a_shot_over_the_real_protocol(fake: FakeComfyUI, tmp_path: Path) -> None:
    seen: list[Progress] = []
    e = engine(fake)
    result = e.render(shot(), tmp_path / "c.mp4", seen.append)
    info = probe(result.path)
    assert (info.frames, info.width, info.height, info.fps) == (17, 128, 128, 16.0)
    assert not result.cached and not result.preview and result.engine == "comfyui"
    # progress of both expert passes reached the callback, step k of n
    # like the real server: each pass reports its own steps (2 of a 2+2 split)
    assert [(p.step, p.total, p.node) for p in seen] == [(1, 2, "81"), (2, 2, "81"),
                                                          (1, 2, "78"), (2, 2, "78")]
    sent = fake.prompts[-1]
    assert sent["81"]["inputs"]["noise_seed"] == 42
    assert sent["74"]["inputs"]["length"] == 17
    assert sent["80"]["inputs"]["filename_prefix"] == "story-to-video/s01_sh01"
    assert set(result.details["node_seconds"]) >= {"81", "78", "87"}


def test_prompt_text_reaches_comfyui_byte_exact(fake: FakeComfyUI, tmp_path: Path) -> None:
    text = 'She says "{hi}"\n\\ caf\u00e9 \u6f22\u5b57 \U0001f40b ../../etc'
    engine(fake).render(shot(prompt=text, negative_prompt="}{"), tmp_path / "c.mp4")
    assert fake.prompts[-1]["89"]["inputs"]["text"] == text
    assert fake.prompts[-1]["72"]["inputs"]["text"] == "}{"


def test_cached_answer_is_reported_as_cached(fake: FakeComfyUI, tmp_path: Path) -> None:
    e = engine(fake)
    first = e.render(shot(), tmp_path / "a.mp4")
    again = e.render(shot(), tmp_path / "b.mp4")
    assert not first.cached
    assert again.cached  # execution_cached covered the output node
    assert "80" in again.details["cached_nodes"]
    assert probe(again.path).frames == 17  # the cached file is still downloaded
    e.force_fresh = True
    fresh = e.render(shot(), tmp_path / "c.mp4")
    assert not fresh.cached
    assert fake.free_calls[-1] == {"unload_models": False, "free_memory": True}


def test_missing_model_stops_before_any_prompt(fake: FakeComfyUI, tmp_path: Path) -> None:
    e = engine(fake)
    e.bound.workflow["75"]["inputs"]["unet_name"] = "missing.safetensors"
    with pytest.raises(WorkflowError, match="node 75 \\(UNETLoader\\): unet_name="
                                            "'missing.safetensors' is not available"):
        e.render(shot(), tmp_path / "c.mp4")
    assert fake.prompts == []  # refused before any GPU time


def test_validation_error_names_the_node(fake: FakeComfyUI, tmp_path: Path) -> None:
    e = engine(fake)
    e._started = True  # skip our preflight: the server's own validation answers
    e.bound.workflow["75"]["inputs"]["unet_name"] = "missing.safetensors"
    with pytest.raises(PromptValidationError) as exc:
        e.render(shot(), tmp_path / "c.mp4")
    assert "Prompt outputs failed validation" in str(exc.value)
    assert "node 75 (UNETLoader): Value not in list (unet_name: 'missing.safetensors'" \
        in str(exc.value)
    assert not (tmp_path / "c.mp4").exists()


def test_unknown_class_is_refused(fake: FakeComfyUI) -> None:
    client = ComfyUIClient(fake.url)
    with pytest.raises(PromptValidationError, match="Node 'WanVideoBlockSwap' not found. The "
                                                    "custom node may not be installed"):
        client.submit({"1": {"class_type": "WanVideoBlockSwap", "inputs": {}}})


def test_oom_becomes_a_typed_error_naming_the_node(fake: FakeComfyUI, tmp_path: Path) -> None:
    fake.faults = Faults(oom_at="VAEDecode")
    with pytest.raises(GpuOutOfMemory) as exc:
        engine(fake).render(shot(), tmp_path / "c.mp4")
    assert exc.value.node_id == "87" and exc.value.node_type == "VAEDecode"
    assert str(exc.value).startswith("node 87 (VAEDecode) failed: torch.OutOfMemoryError: "
                                     "Allocation on device 0")


def test_stall_is_detected_and_interrupted(fake: FakeComfyUI, tmp_path: Path) -> None:
    fake.faults = Faults(stall_at="VAEDecode")
    started = time.monotonic()
    with pytest.raises(StallError, match="stalled in node 87: no progress for 1s"):
        engine(fake, stall_timeout_s=1.0).render(shot(), tmp_path / "c.mp4")
    assert time.monotonic() - started < 8
    assert fake.interrupts == 1


def test_attached_server_cannot_be_restarted(fake: FakeComfyUI) -> None:
    with pytest.raises(RestartUnavailable, match="not started by story-to-video"):
        AttachedComfyUI(fake.url).restart("stall")


def test_dropped_socket_reconnects_and_finishes(fake: FakeComfyUI, tmp_path: Path) -> None:
    fake.faults = Faults(drop_socket_at="VAEDecode")
    result = engine(fake).render(shot(), tmp_path / "c.mp4")
    assert result.details["reconnects"] == 1
    assert probe(result.path).frames == 17


def test_server_dying_mid_shot_is_detected_fast(fake: FakeComfyUI, tmp_path: Path) -> None:
    fake.faults = Faults(crash_at="KSamplerAdvanced")
    started = time.monotonic()
    with pytest.raises(ComfyUIDied, match="went away while running prompt"):
        engine(fake).render(shot(), tmp_path / "c.mp4")
    assert time.monotonic() - started < 10


def test_dead_server_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ComfyUIUnavailable, match=f"no ComfyUI answers at {url}/system_stats"):
        ComfyUIEngine(ComfyUIClient(url), BoundWorkflow.load(T2V),
                      AttachedComfyUI(url)).render(shot(), tmp_path / "c.mp4")


def test_upload_and_i2v_binding(fake: FakeComfyUI, tmp_path: Path) -> None:
    from PIL import Image

    img = tmp_path / "start.png"
    Image.new("RGB", (128, 128), (9, 9, 9)).save(img)
    e = engine(fake, workflows.binding_path("wan22_14b_i2v"))
    e.render(shot(start_image=str(img)), tmp_path / "c.mp4")
    sent = fake.prompts[-1]["97"]["inputs"]["image"]
    assert sent.startswith("story-to-video/stv_start_") and sent.endswith(".png")
    assert fake.uploads[sent] == img.read_bytes()


def test_i2v_without_start_image_is_refused_before_any_prompt(fake: FakeComfyUI,
                                                              tmp_path: Path) -> None:
    e = engine(fake, workflows.binding_path("wan22_14b_i2v"))
    with pytest.raises(WorkflowError, match="shot s01_sh01 has no start image"):
        e.render(shot(), tmp_path / "c.mp4")
    assert fake.prompts == []


def test_system_stats_free_interrupt_queue(fake: FakeComfyUI) -> None:
    c = ComfyUIClient(fake.url)
    assert c.system_stats()["devices"][0]["vram_total"] == 32 * 2**30
    assert c.queue() == {"queue_running": [], "queue_pending": []}
    c.free(unload_models=True)
    assert fake.free_calls == [{"unload_models": True, "free_memory": False}]
    c.interrupt()
    assert fake.interrupts == 1


@pytest.mark.parametrize("name", ["wan22_14b_t2v", "wan22_14b_i2v", "wan22_ti2v_5b"])
def test_shipped_workflows_check_out_against_object_info(name: str) -> None:
    bound = BoundWorkflow.load(workflows.binding_path(name))
    assert bound.offline_problems() == []
    assert bound.online_problems(OBJECT_INFO) == []


def test_online_check_names_missing_custom_node_and_model(tmp_path: Path) -> None:
    bound = BoundWorkflow.load(T2V)
    info = {k: v for k, v in OBJECT_INFO.items() if k != "ModelSamplingSD3"}
    info["UNETLoader"] = json.loads(json.dumps(OBJECT_INFO["UNETLoader"]))
    info["UNETLoader"]["input"]["required"]["unet_name"] = [["other.safetensors"]]
    problems = bound.online_problems(info)
    assert "node 82: class 'ModelSamplingSD3' is not installed in ComfyUI (missing custom " \
           "node?)" in problems
    assert any(p.startswith("node 75 (UNETLoader): unet_name='wan2.2_t2v_high_noise_14B_fp8_"
                            "scaled.safetensors' is not available; ComfyUI has: other") for p
               in problems)


def test_ui_format_is_refused_with_how_to_export(tmp_path: Path) -> None:
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    binding = tmp_path / "b.toml"
    binding.write_text(T2V.read_text().replace("wan22_14b_t2v.json", str(ui)))
    with pytest.raises(WorkflowError, match=r"UI-format workflow.*Export \(API\)"):
        BoundWorkflow.load(binding)


def test_binding_naming_missing_node_or_input(tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text((T2V.parent / "wan22_14b_t2v.json").read_text())
    text = T2V.read_text().replace('"wan22_14b_t2v.json"', f'"{wf}"')
    bad = tmp_path / "b.toml"
    bad.write_text(text.replace('seed = ["81", "noise_seed"]', 'seed = ["999", "seed"]')
                   .replace('fps = ["88", "fps"]', 'fps = ["88", "frame_rate"]'))
    with pytest.raises(WorkflowError) as exc:
        BoundWorkflow.load(bad)
    assert "binding seed: node 999 is not in the workflow" in str(exc.value)
    assert "binding fps: node 88 (CreateVideo) has no input 'frame_rate'" in str(exc.value)
    bad.write_text(text.replace("[inputs]", "[inputs]\ncfg_scale = [\"81\", \"cfg\"]"))
    with pytest.raises(WorkflowError, match="unknown input 'cfg_scale'"):
        BoundWorkflow.load(bad)


def test_fingerprint_is_stable_across_processes() -> None:
    import subprocess
    import sys

    code = ("import workflows;from story_to_video.engines.comfyui import *;"
            "e=ComfyUIEngine(ComfyUIClient('http://x'),BoundWorkflow.load(workflows."
            "binding_path('wan22_14b_t2v')),AttachedComfyUI('http://x'));"
            "e.extra_inputs={'steps': 6};print(e.fingerprint())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(outs) == 1  # resume keys must not change between runs
