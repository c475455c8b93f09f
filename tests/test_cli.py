"""The `story-to-video` command as a user runs it: a real process, real stdout/stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from story_to_video.llm.embedded import free_port


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "story_to_video", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(("args", "msg"), [
    (["run", "--idea", "  "], "error: idea is empty"),
    (["run", "--idea", "x", "--scenes", "0"], "error: scenes must be between 1 and 20, got 0"),
    (["run", "--idea", "x", "--engine", "sora"], "error: invalid setting engine='sora'"),
    (["plan", "--idea", "x", "--llm-backend", "lmstudio", "--llm-url",
      "http://127.0.0.1:{port}/v1"], "error: cannot reach the LLM server at http://127.0.0.1"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], msg: str) -> None:
    args = [a.replace("{port}", str(free_port())) for a in args]
    res = cli(*args, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(msg)
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_plan_json_prints_only_the_plan(tmp_path: Path) -> None:
    res = cli("plan", "--idea", 'a "quoted" {braced} idea \u00e9', "--scenes", "2",
              "--target-seconds", "8", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)  # nothing but JSON on stdout
    assert plan["idea"] == 'a "quoted" {braced} idea \u00e9'
    assert len(plan["scenes"]) == 2
    assert plan["bible"]["characters"]
    assert all(s["prompt"] for sc in plan["scenes"] for s in sc["shots"])
    assert "valid after" in res.stderr  # logs went to stderr


@pytest.mark.slow
def test_doctor_reports_each_service(tmp_path: Path) -> None:
    res = cli("doctor", cwd=tmp_path, timeout=180)
    out = res.stdout
    assert "[ok]   LLM (llamacpp-embedded): llamacpp-embedded at http://127.0.0.1:" in out
    assert "[ok]   engine (preview): preview engine" in out
    assert "GPU: " in out and "Prefect: " in out
    assert res.returncode == 0, out


@pytest.mark.slow
def test_doctor_says_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "story-to-video.toml").write_text(
        f'engine = "comfyui"\n[comfyui]\nurl = "{url}"\n')
    res = cli("doctor", cwd=tmp_path, timeout=180)
    assert res.returncode == 1
    assert f"[FAIL] engine (comfyui): no ComfyUI answers at {url}/system_stats" in res.stdout
    assert "[ok]   disk: " in res.stdout
