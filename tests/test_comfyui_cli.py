from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import workflows
from story_to_video.cli import app
from tests.fake_comfyui import FakeComfyUI

runner = CliRunner()
WF = workflows.WORKFLOWS_DIR / "wan22_14b_t2v.json"


@pytest.fixture()
def fake() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    yield server
    server.stop()


def test_check_offline_and_online(fake: FakeComfyUI) -> None:
    res = runner.invoke(app, ["workflows", "check", str(WF)])
    assert res.exit_code == 0 and "checks out (offline checks only)" in res.output
    res = runner.invoke(app, ["workflows", "check", str(WF), "--comfyui-url", fake.url])
    assert res.exit_code == 0 and f"against {fake.url}" in res.output


def test_check_reports_missing_model(fake: FakeComfyUI, tmp_path: Path) -> None:
    wf = json.loads(WF.read_text())
    wf["76"]["inputs"]["unet_name"] = "wan2.2_low_q4.gguf"
    (tmp_path / "my.json").write_text(json.dumps(wf))
    (tmp_path / "my.binding.toml").write_text(
        (workflows.WORKFLOWS_DIR / "wan22_14b_t2v.binding.toml").read_text()
        .replace("wan22_14b_t2v.json", "my.json"))
    res = runner.invoke(app, ["workflows", "check", str(tmp_path / "my.json"),
                              "--comfyui-url", fake.url])
    assert res.exit_code == 1
    assert "problem: node 76 (UNETLoader): unet_name='wan2.2_low_q4.gguf' is not available" \
        in res.output


def test_check_ui_format(tmp_path: Path) -> None:
    (tmp_path / "ui.json").write_text('{"nodes": [], "links": []}')
    res = runner.invoke(app, ["workflows", "check", str(tmp_path / "ui.json"), "--binding",
                              str(workflows.WORKFLOWS_DIR / "wan22_14b_t2v.binding.toml")])
    assert res.exit_code == 2
    assert "UI-format workflow" in res.output
