"""Helpers for the tests that drive a REAL ComfyUI (scripts/comfyui_test_server.py).

On 2 CPU cores one umt5-xxl text encode takes about a minute and dominates every test, so
all plans here share one prompt text and one negative prompt: ComfyUI's RAM-pressure cache
then encodes each once per server process (and again only after a restart).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from story_to_video.models import Bible, Character, Scene, Shot, ShotPlan
from story_to_video.run import RunFolder, RunSpec
from tests.conftest import ROOT

PROMPT = "a lighthouse keeper walks along the stone pier at dusk, cinematic"
NEGATIVE = "blurry, low quality"
FPS = 16


def tool() -> ModuleType:
    """scripts/comfyui_test_server.py, imported by path (it is a developer script)."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_test_server", ROOT / "scripts" / "comfyui_test_server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("comfyui_test_server", mod)
    spec.loader.exec_module(mod)
    return mod


def make_shot(scene: int, index: int, *, frames: int = 9, width: int = 128,
              height: int = 128, seed: int = 7, **kw: Any) -> Shot:
    base: dict[str, Any] = {
        "id": f"s{scene + 1:02d}_sh{index + 1:02d}", "scene_index": scene, "shot_index": index,
        "action": "the keeper walks along the pier", "prompt": PROMPT,
        "negative_prompt": NEGATIVE, "frames": frames, "fps": FPS, "width": width,
        "height": height, "seed": seed + 100 * scene + index}
    base.update(kw)
    return Shot(**base)


def seed_plan(out: Path, idea: str, shots_per_scene: list[int], *, engine: str = "comfyui",
              **shot_kw: Any) -> RunFolder:
    """A plan on disk (no LLM needed): `story-to-video run` with the same idea resumes it."""
    scenes = []
    for i, n in enumerate(shots_per_scene):
        shots = [make_shot(i, j, **shot_kw) for j in range(n)]
        scenes.append(Scene(index=i, title=f"Scene {i + 1}", setting="a stone pier, dusk",
                            shots=shots))
    total = sum(s.frames for sc in scenes for s in sc.shots) / FPS
    spec = RunSpec(idea=idea, scenes=len(scenes), target_seconds=round(total, 3),
                   style="cinematic", engine=engine, output_dir=out)
    plan = ShotPlan(idea=idea, story="The keeper walks.", style="cinematic",
                    target_seconds=spec.target_seconds, prompt_version="test",
                    bible=Bible(style="cinematic, 35mm", palette="teal and amber",
                                characters=[Character(name="Keeper", look="old, grey beard",
                                                      wardrobe="yellow coat")]),
                    scenes=scenes)
    folder = RunFolder(spec)
    folder.prepare()
    folder.save_plan(plan)
    return folder


def cli_call(folder: RunFolder, url: str, env: dict[str, str] | None = None
             ) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `story-to-video run --engine comfyui` on a
    seeded plan, as a user runs it."""
    spec = folder.spec
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("STV_", "PREFECT_API_URL"))}
    full_env.update({"STV_COMFYUI__URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    full_env.update(env or {})
    args = [sys.executable, "-m", "story_to_video", "run", "--idea", spec.idea,
            "--scenes", str(spec.scenes), "--target-seconds", str(spec.target_seconds),
            "--engine", "comfyui", "--output", str(spec.output_dir)]
    return args, full_env


def run_cli(folder: RunFolder, url: str, *, env: dict[str, str] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
    args, full_env = cli_call(folder, url, env)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=full_env, check=False, cwd=folder.spec.output_dir)


def manifest(folder: RunFolder) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(folder.manifest_path.read_text())
    return data


def model_loads(log_text: str) -> list[str]:
    """What ComfyUI moved onto its device, in order (its 'Requested to load X' lines)."""
    return re.findall(r"Requested to load (\w+)", log_text)


class ReusedServer:
    """A test server the developer started with `comfyui-test-server start --workdir DIR`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "comfyui.log"
        argv = json.loads((workdir / "server.json").read_text())
        self.url, self.pid = argv["url"], argv["pid"]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        return None  # not ours to stop


def attach_or_start(workdir: Path) -> Any:
    import pytest

    reuse = os.environ.get("STV_TEST_COMFYUI_WORKDIR")
    if reuse:
        return ReusedServer(Path(reuse))
    t = tool()
    src = t.source_dir()
    if not (src / "main.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {src}: set STV_COMFYUI_SRC to run the real-server "
                    "tests")
    return t.start(t.prepare(src), workdir)
