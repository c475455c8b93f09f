"""ComfyUI as a supervised child process (the fake, run as its own process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import workflows
from story_to_video.engines.comfyui import (
    BoundWorkflow,
    ComfyUIClient,
    ComfyUIEngine,
    ComfyUIProcess,
    ComfyUIUnavailable,
)
from story_to_video.engines.video_io import probe
from story_to_video.llm.embedded import free_port
from story_to_video.models import Shot
from tests.conftest import ROOT


def process(port: int, log: Path) -> ComfyUIProcess:
    return ComfyUIProcess([sys.executable, "-m", "tests.fake_comfyui_main", "--port",
                           str(port)], url=f"http://127.0.0.1:{port}", cwd=str(ROOT),
                          log_path=log, start_timeout_s=60, stop_timeout_s=10)


def test_start_log_stop_restart(tmp_path: Path) -> None:
    port = free_port()
    p = process(port, tmp_path / "comfyui.log")
    p.start()
    try:
        assert p.alive()
        assert ComfyUIClient(p.url).system_stats()["devices"]
        with pytest.raises(ComfyUIUnavailable, match="refusing to start a second ComfyUI"):
            process(port, tmp_path / "other.log").start()
        p.restart("test")
        assert p.alive() and p.restarts == 1
    finally:
        p.stop()
    assert not p.alive()
    log = (tmp_path / "comfyui.log").read_text()
    assert log.count("fake ComfyUI listening") == 2 and "fake ComfyUI stopped" in log


def test_start_failure_is_clear(tmp_path: Path) -> None:
    p = ComfyUIProcess([sys.executable, "-c", "raise SystemExit(3)"],
                       url=f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "c.log",
                       start_timeout_s=10)
    with pytest.raises(ComfyUIUnavailable, match="exited with code 3 while starting"):
        p.start()


def test_stall_restarts_supervised_comfyui_and_retries(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    once = tmp_path / "stall-once"
    once.write_text("x")
    monkeypatch.setenv("FAKE_STALL_ONCE", str(once))
    port = free_port()
    server = process(port, tmp_path / "comfyui.log")
    engine = ComfyUIEngine(ComfyUIClient(server.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), server, stall_timeout_s=1.5)
    shot = Shot(id="s01_sh01", scene_index=0, shot_index=0, action="a", prompt="p",
                frames=17, fps=16, width=128, height=128, seed=1)
    try:
        result = engine.render(shot, tmp_path / "c.mp4")
    finally:
        engine.close()
    assert server.restarts == 1  # stalled once, restarted, retried
    assert probe(result.path).frames == 17
    assert not once.exists()


def test_server_dying_during_latent_upload(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies while a staged latent is uploaded: one clear error naming the shot
    and stage, nothing half-written; the retry (what the render task does) restarts it."""
    from resource_broker.broker import Broker
    from resource_broker.cost_model import CostModel
    from resource_broker.gpu import NoGpuMonitor
    from story_to_video.engines.comfyui import ComfyUIDied

    marker = tmp_path / "die-once"
    marker.write_text("x")
    monkeypatch.setenv("FAKE_DIE_ON_LATENT_UPLOAD_ONCE", str(marker))
    port = free_port()
    p = process(port, tmp_path / "comfyui.log")
    e = ComfyUIEngine(ComfyUIClient(p.url), BoundWorkflow.load(
        workflows.binding_path("wan22_14b_t2v")), p)
    e.broker = Broker(NoGpuMonitor("test"), CostModel.for_model("wan2.2-14b"),
                      budget_gib=32, strategy="staged")
    s = Shot(id="s01_sh01", scene_index=0, shot_index=0, action="a", prompt="p", frames=17,
             fps=16, width=128, height=128, seed=1)
    try:
        with pytest.raises(ComfyUIDied, match="s01_sh01: ComfyUI went away while the high "
                                              "latent was uploaded"):
            e.render(s, tmp_path / "c.mp4")
        assert not (tmp_path / "c.mp4").exists() and not p.alive()
        result = e.render(s, tmp_path / "c.mp4")  # the task's retry
        assert probe(result.path).frames == 17 and p.restarts == 1
    finally:
        e.close()


def test_an_llm_that_cannot_move_gets_headroom_in_comfyuis_command(tmp_path: Path) -> None:
    from story_to_video.config import Settings
    from story_to_video.engines.comfyui.engine import headroom_args

    src = tmp_path / "ComfyUI"
    src.mkdir()
    (src / "comfyui_version.py").write_text('__version__ = "0.33.0"\n')
    cmd = ["python", str(src / "main.py"), "--port", "8188"]

    def args(backend: str, gib: float, version: str | None = None) -> list[str]:
        if version:
            (src / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        return headroom_args(Settings(engine="comfyui", comfyui={"command": cmd},
                                      llm={"backend": backend,
                                           "base_url": "http://127.0.0.1:8080/v1"},
                                      broker={"llm_gib": gib}))

    assert args("openai-compatible", 12) == ["--vram-headroom", "12"]
    assert args("openai-compatible", 12, "0.8.0") == ["--reserve-vram", "12"]
    assert args("lmstudio", 12) == []  # the broker moves it before the video work
    assert args("openai-compatible", 0) == []  # nothing known to keep free
