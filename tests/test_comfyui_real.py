"""Against a real ComfyUI: set COMFYUI_URL (e.g. http://127.0.0.1:8188). Skipped otherwise.

Checks the protocol facts the fake server relies on, on the real thing."""

from __future__ import annotations

import os

import pytest

import workflows
from story_to_video.engines.comfyui import BoundWorkflow, ComfyUIClient, PromptValidationError

URL = os.environ.get("COMFYUI_URL")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not URL, reason="set COMFYUI_URL to test a real ComfyUI")]


def test_system_stats_and_object_info_shapes() -> None:
    c = ComfyUIClient(URL or "")
    stats = c.system_stats()
    assert {"system", "devices"} <= set(stats)
    assert "vram_free" in stats["devices"][0]
    info = c.object_info()
    for cls in ("KSamplerAdvanced", "VAEDecode", "VAEDecodeTiled", "SaveLatent", "LoadLatent"):
        assert cls in info


def test_unknown_class_answers_400_like_the_fake() -> None:
    with pytest.raises(PromptValidationError, match="does not exist"):
        ComfyUIClient(URL or "").submit({"1": {"class_type": "NoSuchNode", "inputs": {}}})


def test_shipped_workflows_report_their_problems_only() -> None:
    info = ComfyUIClient(URL or "").object_info()
    for name in workflows.builtin_names():
        problems = BoundWorkflow.load(workflows.binding_path(name)).online_problems(info)
        # only missing model files may be reported on a machine without Wan weights
        assert all("is not available" in p for p in problems), problems
