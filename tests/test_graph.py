"""Graph surgery: pure functions on API-format workflows."""

from __future__ import annotations

import copy
import json

import pytest

import workflows
from story_to_video.engines.comfyui import ComfyUIClient, WorkflowError
from story_to_video.engines.comfyui.graph import (
    append_rife,
    set_lora_strengths,
    split_stages,
    use_tiled_decode,
)
from tests.fake_comfyui import OBJECT_INFO, FakeComfyUI

WF = json.loads((workflows.WORKFLOWS_DIR / "wan22_14b_t2v.json").read_text())


def test_tiled_decode_keeps_links_and_original() -> None:
    before = copy.deepcopy(WF)
    out = use_tiled_decode(WF, "87", tile_size=256, overlap=32, temporal_size=32,
                           temporal_overlap=4)
    assert before == WF  # pure
    assert out["87"]["class_type"] == "VAEDecodeTiled"
    assert out["87"]["inputs"] == {"samples": ["78", 0], "vae": ["73", 0], "tile_size": 256,
                                   "overlap": 32, "temporal_size": 32, "temporal_overlap": 4}
    assert out["88"]["inputs"]["images"] == ["87", 0]
    assert {k: v for k, v in out.items() if k != "87"} == {k: v for k, v in WF.items()
                                                           if k != "87"}
    with pytest.raises(WorkflowError, match="not a VAE decode"):
        use_tiled_decode(WF, "81")
    with pytest.raises(WorkflowError, match="bad tile sizes"):
        use_tiled_decode(WF, "87", tile_size=64, overlap=64)


def test_lora_strengths_per_pass() -> None:
    out = set_lora_strengths(WF, {"83": 3.0, "85": 1.0})
    assert (out["83"]["inputs"]["strength_model"], out["85"]["inputs"]["strength_model"]) \
        == (3.0, 1.0)
    assert WF["83"]["inputs"]["strength_model"] == 1.0
    with pytest.raises(WorkflowError, match="not a LoRA loader"):
        set_lora_strengths(WF, {"75": 2.0})


def test_rife_goes_between_decode_and_video_only_when_installed() -> None:
    with pytest.raises(WorkflowError, match="needs the custom node 'RIFE VFI'"):
        append_rife(WF, "87", object_info=OBJECT_INFO)
    out = append_rife(WF, "87", multiplier=2)
    assert out["rife1"]["inputs"]["frames"] == ["87", 0]
    assert out["88"]["inputs"]["images"] == ["rife1", 0]
    assert out["rife1"]["inputs"]["multiplier"] == 2


def test_split_into_three_stages_each_loading_only_what_it_needs() -> None:
    high, low, dec = split_stages(WF, high_sampler="81", low_sampler="78", decode="87",
                                  output="80", prefix="stv/s01_sh01")
    assert "81" in high.workflow and "78" not in high.workflow and "76" not in high.workflow
    assert high.workflow[high.latent_out or ""]["inputs"]["samples"] == ["81", 0]
    # pass 2 never loads the high-noise expert (75) nor runs pass 1
    assert "75" not in low.workflow and "81" not in low.workflow
    assert low.workflow["78"]["inputs"]["latent_image"] == [low.latent_in, 0]
    assert {"76", "85", "86"} <= set(low.workflow)
    # decode loads no diffusion model at all
    assert not any(n["class_type"] == "UNETLoader" for n in dec.workflow.values())
    assert dec.workflow["87"]["inputs"]["samples"] == [dec.latent_in, 0]
    assert {"87", "88", "80", "73"} <= set(dec.workflow)
    with pytest.raises(WorkflowError, match="not a two-expert graph"):
        split_stages(WF, high_sampler="78", low_sampler="81", decode="87", output="80",
                     prefix="x")


def test_every_stage_is_accepted_by_comfyui_validation() -> None:
    fake = FakeComfyUI().start()
    try:
        client = ComfyUIClient(fake.url)
        for stage in split_stages(WF, high_sampler="81", low_sampler="78", decode="87",
                                  output="80", prefix="stv/x"):
            wf = copy.deepcopy(stage.workflow)
            if stage.latent_in:
                fake.uploads["x_high.latent"] = json.dumps(  # as /upload/image would
                    {"frames": 17, "width": 64, "height": 64}).encode()
                wf[stage.latent_in]["inputs"]["latent"] = "x_high.latent"
            ex = client.run(wf, stall_timeout_s=10)
            assert ex.finished > 0
    finally:
        fake.stop()
