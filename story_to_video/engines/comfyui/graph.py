"""Graph surgery: pure functions that take an API-format workflow and return a new one."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .errors import WorkflowError

Workflow = dict[str, dict[str, Any]]


def _is_link(val: Any) -> bool:
    return isinstance(val, list) and len(val) == 2 and isinstance(val[1], int)


def _new_id(wf: Workflow, hint: str) -> str:
    i = 1
    while f"{hint}{i}" in wf:
        i += 1
    return f"{hint}{i}"


def _node(wf: Workflow, node_id: str, cls: str | None = None) -> dict[str, Any]:
    if node_id not in wf:
        raise WorkflowError(f"node {node_id} is not in the workflow")
    if cls is not None and wf[node_id]["class_type"] != cls:
        raise WorkflowError(f"node {node_id} is {wf[node_id]['class_type']}, not {cls}")
    return wf[node_id]


def consumers(wf: Workflow, node_id: str) -> list[tuple[str, str]]:
    """(node, input) pairs that read any output of node_id."""
    return [(nid, inp) for nid, n in wf.items() for inp, v in n["inputs"].items()
            if _is_link(v) and str(v[0]) == node_id]


def ancestors(wf: Workflow, roots: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        stack += [str(v[0]) for v in _node(wf, nid)["inputs"].values() if _is_link(v)]
    return seen


def use_tiled_decode(wf: Workflow, decode_id: str, *, tile_size: int = 512,
                     overlap: int = 64, temporal_size: int = 64,
                     temporal_overlap: int = 8) -> Workflow:
    """Swap VAEDecode for VAEDecodeTiled (same id, so every link to it still holds)."""
    if tile_size < 64 or overlap >= tile_size or temporal_size < 8 or temporal_overlap < 4:
        raise WorkflowError(f"bad tile sizes: tile {tile_size}, overlap {overlap}, "
                            f"temporal {temporal_size}/{temporal_overlap}")
    out = copy.deepcopy(wf)
    node = _node(out, decode_id)
    if node["class_type"] not in ("VAEDecode", "VAEDecodeTiled"):
        raise WorkflowError(f"node {decode_id} is {node['class_type']}, not a VAE decode")
    out[decode_id] = {
        "class_type": "VAEDecodeTiled",
        "inputs": {"samples": node["inputs"]["samples"], "vae": node["inputs"]["vae"],
                   "tile_size": tile_size, "overlap": overlap,
                   "temporal_size": temporal_size, "temporal_overlap": temporal_overlap},
        "_meta": {"title": "VAE decode (tiled)"},
    }
    return out


def set_lora_strengths(wf: Workflow, strengths: dict[str, float]) -> Workflow:
    """{node id: strength} for LoraLoaderModelOnly / LoraLoader nodes."""
    out = copy.deepcopy(wf)
    for nid, strength in strengths.items():
        node = _node(out, nid)
        if node["class_type"] not in ("LoraLoaderModelOnly", "LoraLoader"):
            raise WorkflowError(f"node {nid} is {node['class_type']}, not a LoRA loader")
        node["inputs"]["strength_model"] = float(strength)
    return out


def append_rife(wf: Workflow, decode_id: str, *, multiplier: int = 2,
                ckpt_name: str = "rife47.pth", object_info: dict[str, Any] | None = None
                ) -> Workflow:
    """Insert `RIFE VFI` (ComfyUI-Frame-Interpolation) between the decode and what reads it.

    The caller must scale the video's fps by `multiplier`. With object_info given, refuses
    when the node is not installed.
    """
    if object_info is not None and "RIFE VFI" not in object_info:
        raise WorkflowError("RIFE interpolation needs the custom node 'RIFE VFI' "
                            "(ComfyUI-Frame-Interpolation), which this ComfyUI lacks")
    if multiplier < 2:
        raise WorkflowError(f"RIFE multiplier must be >= 2, got {multiplier}")
    out = copy.deepcopy(wf)
    _node(out, decode_id)
    readers = consumers(out, decode_id)
    rid = _new_id(out, "rife")
    out[rid] = {"class_type": "RIFE VFI", "inputs": {
        "frames": [decode_id, 0], "ckpt_name": ckpt_name, "clear_cache_after_n_frames": 10,
        "multiplier": multiplier, "fast_mode": True, "ensemble": True, "scale_factor": 1.0},
        "_meta": {"title": "RIFE VFI"}}
    for nid, inp in readers:
        out[nid]["inputs"][inp] = [rid, 0]
    return out


@dataclass(frozen=True)
class Stage:
    name: str  # "high", "low" or "decode"
    workflow: Workflow
    latent_in: str | None  # LoadLatent node whose `latent` input gets the previous file
    latent_out: str | None  # SaveLatent node whose output feeds the next stage


def split_stages(wf: Workflow, *, high_sampler: str, low_sampler: str, decode: str,
                 output: str, prefix: str) -> list[Stage]:
    """Two-expert graph -> pass 1 -> latent, pass 2 -> latent, decode -> video.

    The broker can act between stages (unload the high-noise expert, check decode
    headroom). Latents are handed over as files: SaveLatent writes to ComfyUI's output
    folder; the caller uploads that file to the input folder for the next LoadLatent.
    """
    for nid in (high_sampler, low_sampler, decode, output):
        _node(wf, nid)
    if wf[low_sampler]["inputs"].get("latent_image") != [high_sampler, 0]:
        raise WorkflowError(f"low-noise sampler {low_sampler} does not read the high-noise "
                            f"sampler {high_sampler}'s latent: not a two-expert graph")
    stages = []
    # Pass 1: everything the high-noise sampler needs, then save its latent.
    s1 = {nid: copy.deepcopy(wf[nid]) for nid in ancestors(wf, [high_sampler])}
    save1 = _new_id(wf, "save_latent_")
    s1[save1] = {"class_type": "SaveLatent", "inputs": {"samples": [high_sampler, 0],
                 "filename_prefix": f"{prefix}_high"}, "_meta": {"title": "Save latent"}}
    stages.append(Stage("high", s1, None, save1))
    # Pass 2: the low-noise sampler fed from a loaded latent.
    low_wf = copy.deepcopy(wf)
    load2 = _new_id(wf, "load_latent_")
    low_wf[load2] = {"class_type": "LoadLatent", "inputs": {"latent": ""},
                     "_meta": {"title": "Load latent"}}
    low_wf[low_sampler]["inputs"]["latent_image"] = [load2, 0]
    s2 = {nid: low_wf[nid] for nid in ancestors(low_wf, [low_sampler])}
    save2 = _new_id(low_wf, "save_latent_")
    s2[save2] = {"class_type": "SaveLatent", "inputs": {"samples": [low_sampler, 0],
                 "filename_prefix": f"{prefix}_low"}, "_meta": {"title": "Save latent"}}
    stages.append(Stage("low", s2, load2, save2))
    # Decode: loaded latent -> decode -> everything down to the output node.
    dec_wf = copy.deepcopy(wf)
    load3 = _new_id(wf, "load_latent_")
    dec_wf[load3] = {"class_type": "LoadLatent", "inputs": {"latent": ""},
                     "_meta": {"title": "Load latent"}}
    dec_wf[decode]["inputs"]["samples"] = [load3, 0]
    s3 = {nid: dec_wf[nid] for nid in ancestors(dec_wf, [output])}
    if low_sampler in s3 or high_sampler in s3:
        raise WorkflowError("the output still depends on a sampler after the decode split")
    stages.append(Stage("decode", s3, load3, None))
    return stages
