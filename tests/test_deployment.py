"""The path a user takes: Prefect server, process work pool, `prefect deploy`, a worker,
`prefect deployment run 'story-to-video/default'`, and the run completes with a video."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.prefect_server import PREFECT, prefect_server

pytestmark = pytest.mark.slow


@pytest.fixture()
def prefect_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with prefect_server(tmp_path) as env:
        yield env


def prefect(env: dict[str, str], *args: str, cwd: Path, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}{res.stderr}"
    return res


def test_deploy_and_run_default(prefect_env: dict[str, str], tmp_path: Path) -> None:
    project = tmp_path / "project"  # a checkout, as a user would have it
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    out = tmp_path / "videos"
    prefect(prefect_env, "work-pool", "create", "story-to-video", "--type", "process",
            cwd=project)
    prefect(prefect_env, "--no-prompt", "deploy", "--all", cwd=project)
    listed = prefect(prefect_env, "deployment", "ls", cwd=project).stdout
    assert "story-to-video/default" in listed and "story-to-video/overnight" in listed

    worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "story-to-video"],
                              env=prefect_env, cwd=project, stdout=worker_log,
                              stderr=subprocess.STDOUT)
    try:
        res = prefect(prefect_env, "deployment", "run", "story-to-video/default",
                      "--param", "idea=a snail races a train", "--param", "scenes=1",
                      "--param", "target_seconds=4", "--param", f"output_dir={out}",
                      "--watch", "--watch-timeout", "400", cwd=project, timeout=420)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a worker slow to shut down is not this test's
            worker.kill()
            worker.wait(timeout=30)
        worker_log.close()
    assert "Completed" in res.stdout, res.stdout + (tmp_path / "worker.log").read_text()
    finals = list(out.glob("*/final.mp4"))
    assert len(finals) == 1
    manifest = json.loads((finals[0].parent / "manifest.json").read_text())
    assert manifest["idea"] == "a snail races a train"
    assert manifest["final"]["frames"] == sum(r["frames"] for r in manifest["shots"])
