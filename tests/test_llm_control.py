"""Moving the LLM, per backend, against the servers' documented APIs (tests/fake_llm_servers.py
names the documents) and a real llama.cpp server the project starts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from resource_broker.broker import Broker
from resource_broker.cost_model import CostModel
from resource_broker.llm_control import LlamaServerControl, LMStudioControl, OllamaControl
from resource_broker.policy import plan_shot
from story_to_video.llm.embedded import CommandLlamaServer, bundled_model_path, free_port
from tests.fake_llm_servers import FakeLMStudio, FakeOllama, SdkStandIn
from tests.test_broker import ScriptedMonitor


@pytest.fixture
def lms() -> Iterator[FakeLMStudio]:
    fake = FakeLMStudio(token="secret").start()
    yield fake
    fake.stop()


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama().start()
    yield fake
    fake.stop()


def test_ollama_unload_partial_offload_and_reload(ollama: FakeOllama) -> None:
    c = OllamaControl(f"{ollama.url}/v1", "llama3.1")
    assert c.gpu_gib() == pytest.approx(8.0)  # size_vram of /api/ps
    assert c.release(0.0) == "ollama: unloaded llama3.1 (keep_alive 0)"
    assert ollama.loaded_layers is None and c.gpu_gib() == 0.0
    assert ollama.requests[-1] == ("/api/generate", {"model": "llama3.1", "keep_alive": 0})
    # half of 33 offloadable layers (32 blocks from /api/show, plus the output layer)
    assert c.release(0.5) == "ollama: reloaded llama3.1 with num_gpu=16"
    assert ollama.loaded_layers == 16
    assert c.gpu_gib() == pytest.approx(8.0 * 16 / 33, rel=0.01)
    assert "loaded again" in c.restore()
    assert ollama.loaded_layers == 33 and c.gpu_gib() == pytest.approx(8.0)


def test_ollama_errors_keep_the_servers_text_and_count_the_vram(ollama: FakeOllama) -> None:
    missing = OllamaControl(ollama.url, "mistral")
    assert "HTTP 404: model 'mistral' not found" in missing.release(0.0)
    ollama.faults.unload_status = 500
    c = OllamaControl(ollama.url, "llama3.1")
    msg = c.release(0.0)
    assert msg == ("ollama did not unload (_ServerError: HTTP 500: internal error); its "
                   "8.0 GiB are counted as taken")
    assert not c.controllable and c.gpu_gib() == pytest.approx(8.0)


def test_lmstudio_unload_reload_with_ratio_and_restore(lms: FakeLMStudio) -> None:
    sdk = SdkStandIn(lms)
    c = LMStudioControl(f"{lms.url}/v1", "qwen2.5-14b-instruct", api_key="secret", sdk=sdk)
    assert c.gpu_gib() == pytest.approx(12.0)  # size_bytes of the loaded model
    assert c.release(0.0) == "lmstudio: unloaded qwen2.5-14b-instruct"
    assert lms.requests[-1] == ("/api/v1/models/unload",
                                {"instance_id": "qwen2.5-14b-instruct"})
    assert c.gpu_gib() == 0.0
    assert c.restore() == "lmstudio: qwen2.5-14b-instruct loaded again"
    assert lms.requests[-1] == ("/api/v1/models/load", {"model": "qwen2.5-14b-instruct"})
    # partial offload: REST has no GPU setting, the SDK loads with the broker's ratio
    assert "with GPU ratio 0.62" in c.release(0.62)
    assert sdk.calls == [("qwen2.5-14b-instruct", {"gpu": {"ratio": 0.62}})]
    assert list(lms.ratios.values()) == [0.62]
    c.restore()
    assert list(lms.ratios.values()) == ["max"]  # the partial instance went, a full one came


def test_restore_event_says_what_the_llm_holds_again(lms: FakeLMStudio) -> None:
    """The H100 runs logged 'restore (need 0.00 GiB ...)': the size read before the reload,
    when an unloaded LLM holds nothing."""
    c = LMStudioControl(f"{lms.url}/v1", "qwen2.5-14b-instruct", api_key="secret",
                        sdk=SdkStandIn(lms))
    b = Broker(ScriptedMonitor(32, [30.0]), CostModel.for_model("wan2.2-14b"), budget_gib=32,
               llm=c)
    assert b.place_llm_for_video(b.plan(81, 832, 480)).action == "unload"
    ev = b.restore_llm()
    assert ev is not None and ev.action == "restore"
    assert (ev.predicted_gib, ev.free_gib) == (pytest.approx(12.0), 30.0)
    assert ev.outcome == "lmstudio: qwen2.5-14b-instruct loaded again"


def test_lmstudio_without_its_token_is_refused_and_counted(lms: FakeLMStudio) -> None:
    c = LMStudioControl(f"{lms.url}/v1", None, gib=9.0)
    assert "HTTP 401: Unauthorized" in c.release(0.0) and not c.controllable


@pytest.mark.parametrize("which", ["lmstudio", "ollama"])
def test_llm_that_does_not_answer_the_unload_is_planned_around(
        which: str, lms: FakeLMStudio, ollama: FakeOllama) -> None:
    c: LMStudioControl | OllamaControl
    if which == "lmstudio":
        lms.faults.stall_unload_s = 3.0
        c = LMStudioControl(lms.url, "qwen2.5-14b-instruct", api_key="secret", timeout_s=0.5)
    else:
        ollama.faults.stall_unload_s = 3.0
        ollama.size = 14 * 2**30  # too big to stay beside the video work
        c = OllamaControl(ollama.url, "llama3.1", timeout_s=0.5)
    held = c.gpu_gib()
    b = Broker(ScriptedMonitor(32, [30.0]), CostModel.for_model("wan2.2-14b"), budget_gib=32,
               llm=c)
    event = b.place_llm_for_video(b.plan(81, 832, 480))
    assert event.action in ("unload", "partial-offload")
    assert "did not unload (ReadTimeout" in event.outcome
    assert f"{held:.1f} GiB are counted as taken" in event.outcome
    after = b.plan(81, 832, 480)  # from now on the broker plans around it
    assert after.decision("llm").action == "uncontrolled"
    assert after.llm_gib == pytest.approx(held)
    # every stage's peak counts the LLM's VRAM and still stays inside budget minus margin
    alone = plan_shot(CostModel.for_model("wan2.2-14b"), 81, 832, 480, budget_gib=32 - held)
    assert after.stage_peaks_gib == pytest.approx(
        {k: v + held for k, v in alone.stage_peaks_gib.items()}, abs=0.02)
    assert after.peak_gib <= 32 - 1.0


def test_command_flags_are_rewritten() -> None:
    s = CommandLlamaServer(["llama-server", "-m", "/m/q.gguf", "--port", "8080", "-ngl", "99"],
                           "http://127.0.0.1:8080/v1")
    assert s.gpu_layers == 99 and s.model_path == Path("/m/q.gguf")
    s.gpu_layers = 12
    assert s.command() == ["llama-server", "-m", "/m/q.gguf", "--port", "8080",
                           "--n-gpu-layers", "12"]


@pytest.mark.slow
def test_llama_server_from_a_user_command_restarts_with_other_gpu_layers(
        tmp_path: Path) -> None:
    """The real llama.cpp server (llama-cpp-python) started from a user's command."""
    port = free_port()
    server = CommandLlamaServer(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()),
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1",
         "--n_gpu_layers", "31"], f"http://127.0.0.1:{port}/v1",
        log_path=tmp_path / "llm.log")
    with server.running_server():
        c = LlamaServerControl(server, gib=0.1)
        assert c.gpu_gib() == pytest.approx(0.1)  # all 31 layers (30 blocks + output)
        first = server.pid
        assert c.release(0.5) == "llama.cpp server restarted with --n_gpu_layers 16"
        assert server.pid != first and server.running
        assert server._proc is not None and server._proc.args[-2:] == ["--n_gpu_layers", "16"]
        assert httpx.get(f"{server.base_url}/models").status_code == 200
        assert c.gpu_gib() == pytest.approx(0.1 * 16 / 31)
        assert c.release(0.0) == "llama.cpp server restarted with --n_gpu_layers 0"
        assert c.gpu_gib() == 0.0 and httpx.get(f"{server.base_url}/models").is_success
        assert c.restore() == "llama.cpp server restarted with --n_gpu_layers 31"
    assert not server.running
