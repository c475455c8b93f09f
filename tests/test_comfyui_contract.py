"""One contract, two servers: every assertion here runs against the fake ComfyUI and against
the real ComfyUI 0.33 (when ../shared/comfyui is present), so a divergence fails a test.

Only cheap graphs run (no text encoder): an empty video latent saved to a file, a corrupt
latent loaded, a validation error. The fixtures the fake replays were recorded from the real
server by scripts/record_comfyui_transcripts.py.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

import workflows
from story_to_video.engines.comfyui import (
    BoundWorkflow,
    ComfyUIClient,
    ExecutionError,
    PromptValidationError,
)
from story_to_video.engines.comfyui.server_info import ServerInfo
from tests.fake_comfyui import FakeComfyUI

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
T2V = json.loads((Path(workflows.__file__).parent / "wan22_14b_t2v.json").read_text())
I2V = json.loads((Path(workflows.__file__).parent / "wan22_14b_i2v.json").read_text())


@pytest.fixture(params=["fake", pytest.param("real", marks=[pytest.mark.slow,
                                                            pytest.mark.comfyui_real])])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "fake":
        fake = FakeComfyUI().start()
        fake.device = "cpu"  # the recorded server is a CPU one
        yield fake.url
        fake.stop()
    else:
        yield request.getfixturevalue("real_comfyui").url


def cheap(tag: str, length: int = 5) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 32, "height": 32, "length": length, "batch_size": 1}},
            "2": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["1", 0], "filename_prefix": f"contract/{tag}"}}}


def unique() -> int:
    return int(time.time() * 1000) % 4000 * 4 + 1  # a latent length never seen before


def record(url: str, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Queue a prompt; every WebSocket message until ComfyUI says it is done."""
    cid = f"contract-{time.time_ns()}"
    ws = connect(f"{url.replace('http', 'ws')}/ws?clientId={cid}", max_size=2**26)
    try:
        r = httpx.post(f"{url}/prompt", json={"prompt": prompt, "client_id": cid})
        r.raise_for_status()
        pid = r.json()["prompt_id"]
        msgs = []
        while True:
            raw = ws.recv(timeout=120)
            assert isinstance(raw, str), "binary preview frames although none were asked for"
            m = json.loads(raw)
            msgs.append(m)
            if m["type"] == "executing" and m["data"]["node"] is None \
                    and m["data"].get("prompt_id") == pid:
                return pid, msgs
    finally:
        ws.close()


def shape(msgs: list[dict[str, Any]]) -> list[str]:
    """The message sequence without progress_state, with node ids where they matter."""
    out = []
    for m in msgs:
        kind, data = m["type"], m["data"]
        if kind == "progress_state":
            continue
        node = data.get("node")
        out.append(f"{kind}:{node}" if kind in ("executing", "executed") else kind)
    return out


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


# -- HTTP shapes ---------------------------------------------------------------------------
def test_system_stats(server: str) -> None:
    stats = httpx.get(f"{server}/system_stats").json()
    info = ServerInfo.from_system_stats(stats)
    assert info.version == "0.33.0" and info.known
    assert info.device_type == "cpu" and info.vram_total_bytes is None  # RAM, not VRAM
    assert info.cache_mode == "ram" and info.dynamic_vram is False
    assert set(stats["devices"][0]) >= {"name", "type", "vram_total", "vram_free",
                                        "torch_vram_total", "torch_vram_free"}


def test_object_info_forms(server: str) -> None:
    info = ComfyUIClient(server).object_info()
    assert info["WanImageToVideo"]["output_name"] == ["positive", "negative", "latent"]
    assert info["SaveVideo"]["input"]["required"]["format"][0] == "COMFY_DYNAMICCOMBO_V3"
    length = info["EmptyHunyuanLatentVideo"]["input"]["required"]["length"][1]
    assert (length["min"], length["step"]) == (1, 4)
    tiled = info["VAEDecodeTiled"]["input"]["required"]
    assert (tiled["tile_size"][1]["step"], tiled["temporal_size"][1]["step"]) == (32, 4)
    assert info["SaveLatent"]["output_node"] and not info["LoadLatent"]["output_node"]
    for name in workflows.builtin_names():  # the shipped workflows bind to real inputs
        assert BoundWorkflow.load(workflows.binding_path(name)).online_problems(info) == []


# -- validation errors ----------------------------------------------------------------------
CASES = {
    "missing_node_type": (T2V, lambda w: w["88"].update(class_type="NoSuchNode")),
    "value_not_in_list": (T2V, lambda w: w["75"]["inputs"].update(unet_name="nope.sft")),
    "value_smaller_than_min": (T2V, lambda w: w["74"]["inputs"].update(length=0)),
    "value_bigger_than_max": (T2V, lambda w: w["74"]["inputs"].update(length=99999)),
    "invalid_input_type": (T2V, lambda w: w["74"]["inputs"].update(width="wide")),
    "required_input_missing": (T2V, lambda w: w["74"]["inputs"].pop("height")),
    "prompt_no_outputs": (T2V, lambda w: [w.pop(k) for k in ("80", "88")]),
    "return_type_mismatch": (T2V, lambda w: w["87"]["inputs"].update(vae=["71", 0])),
    "exception_during_inner_validation": (T2V, lambda w: w["87"]["inputs"].update(
        vae=["999", 0])),
    "custom_validation_failed": (I2V, lambda w: w["97"]["inputs"].update(image="start.png")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_error(server: str, case: str) -> None:
    base, mutate = CASES[case]
    wf = copy.deepcopy(base)
    mutate(wf)
    r = httpx.post(f"{server}/prompt", json={"prompt": wf, "client_id": "contract"})
    assert r.status_code == 400
    body = r.json()
    want = recorded("validation_errors.json")[case]["body"]
    assert body["error"]["type"] == want["error"]["type"]
    assert set(body["node_errors"]) == set(want["node_errors"])
    for nid, errs in want["node_errors"].items():
        got = body["node_errors"][nid]
        assert [e["type"] for e in got["errors"]] == [e["type"] for e in errs["errors"]]
        assert got["dependent_outputs"] == errs["dependent_outputs"] == ["80"]
        for g, w in zip(got["errors"], errs["errors"], strict=True):
            assert set(g["extra_info"]) >= set(w["extra_info"]) - {"traceback"}
            assert g["message"] == w["message"]
    with pytest.raises(PromptValidationError):  # and the client names it
        ComfyUIClient(server).submit(wf)


# -- WebSocket sequences ----------------------------------------------------------------------
def test_fresh_then_cached_prompt(server: str) -> None:
    g = cheap("fresh", unique())
    _, fresh = record(server, g)
    assert shape(fresh) == shape(recorded("ws_fresh.json")["messages"])
    assert shape(fresh)[:3] == ["status", "status", "status"]  # connect + queued twice
    assert any(m["type"] == "progress_state" for m in fresh)
    pid, cached = record(server, g)
    assert shape(cached) == shape(recorded("ws_cached.json")["messages"])
    assert next(m["data"]["nodes"] for m in cached if m["type"] == "execution_cached") \
        == ["1", "2"]
    ex = ComfyUIClient(server).run(g)  # the client's reading of the same answer
    assert ex.fully_cached and set(ex.outputs) == {"2"}
    entry = httpx.get(f"{server}/history/{pid}").json()[pid]
    _number, hid, prompt, extra, outputs = entry["prompt"]
    assert hid == pid and prompt == g and set(extra) >= {"client_id", "create_time"}
    assert outputs == ["2"] and entry["status"]["status_str"] == "success"
    assert entry["outputs"]["2"]["latents"][0]["filename"].endswith(".latent")


def test_failing_prompt(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "contract_corrupt.latent"
    bad.write_bytes(b"not a latent")
    client = ComfyUIClient(server)
    name = client.upload_image(bad, subfolder="")
    g = {"1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
         "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0],
                                                      "filename_prefix": "contract/fail"}}}
    pid, msgs = record(server, g)
    assert shape(msgs) == shape(recorded("ws_failing.json")["messages"])
    err = next(m["data"] for m in msgs if m["type"] == "execution_error")
    assert (err["node_id"], err["node_type"]) == ("1", "LoadLatent")
    assert "SafetensorError" in err["exception_type"]
    with pytest.raises(ExecutionError, match=r"node 1 \(LoadLatent\) failed"):
        client.run(g)
    status = httpx.get(f"{server}/history/{pid}").json()[pid]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)


def test_free_flags_act_between_prompts(server: str) -> None:
    client = ComfyUIClient(server)
    g = cheap("free", unique())
    client.run(g)
    r = httpx.post(f"{server}/free", json={"unload_models": True})
    assert (r.status_code, r.text) == (200, "")
    assert client.run(g).fully_cached  # unload_models keeps the cache
    client.free(free_memory=True)
    again = client.run(g)
    assert not again.fully_cached and again.cached_nodes == set()  # free_memory resets it
    want = recorded("free_semantics.json")["cached_nodes"]
    assert (want["after_unload_models"], want["after_free_memory"]) == (["1", "2"], [])


def test_queue_entry_while_running(server: str) -> None:
    """A prompt queued behind a running one is listed in the real entry form."""
    cid = "contract-queue"
    ws = connect(f"{server.replace('http', 'ws')}/ws?clientId={cid}")
    try:
        pids = [httpx.post(f"{server}/prompt", json={"prompt": cheap(f"q{i}", unique() + 4 * i),
                                                     "client_id": cid}).json()["prompt_id"]
                for i in range(3)]
        q = httpx.get(f"{server}/queue").json()
        entries = q["queue_running"] + q["queue_pending"]
        for e in entries:
            number, pid, _prompt, extra, outputs = e
            assert isinstance(number, int) and pid in pids and outputs == ["2"]
            assert extra["client_id"] == cid and "create_time" in extra
        recorded_entry = recorded("ws_slow_with_queue.json")["during"]["queue_running"][0]
        assert len(recorded_entry) == 5 and set(recorded_entry[3]) == {"client_id",
                                                                       "create_time"}
    finally:
        ws.close()
    for pid in pids:  # let them finish before the next test
        deadline = time.monotonic() + 60
        while not httpx.get(f"{server}/history/{pid}").json():
            assert time.monotonic() < deadline
            time.sleep(0.1)
