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


def cut_optional_input(wf: Workflow, node_ids: list[str]) -> Workflow:
    """Remove nodes (a TI2V workflow's LoadImage when a shot has no start image) and the
    inputs that read them; those inputs must be optional in their class."""
    out = copy.deepcopy(wf)
    for nid in node_ids:
        for reader, inp in consumers(out, nid):
            del out[reader]["inputs"][inp]
        out.pop(nid, None)
    return out


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


def place_text_encoder(wf: Workflow, device: str) -> tuple[Workflow, list[str]]:
    """Run the text encoder on `device` ("cpu" or "default") through CLIPLoader's own
    `device` input; returns the new workflow and the loader nodes changed."""
    out = copy.deepcopy(wf)
    changed = []
    for nid, node in out.items():
        if node["class_type"] in ("CLIPLoader", "DualCLIPLoader") and \
                "device" in node["inputs"]:
            node["inputs"]["device"] = device
            changed.append(nid)
    return out, changed


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
    # Pass 1: everything the high-noise sampler needs, then save its latent.
    high = {nid: copy.deepcopy(wf[nid]) for nid in ancestors(wf, [high_sampler])}
    save1 = _save_latent(high, high_sampler, f"{prefix}_high")
    # Pass 2: the low-noise sampler fed from a loaded latent, then save its latent.
    low, load2 = _from_loaded_latent(wf, low_sampler, "latent_image", low_sampler)
    save2 = _save_latent(low, low_sampler, f"{prefix}_low")
    # Decode: loaded latent -> decode -> everything down to the output node.
    dec, load3 = _from_loaded_latent(wf, decode, "samples", output)
    if low_sampler in dec or high_sampler in dec:
        raise WorkflowError("the output still depends on a sampler after the decode split")
    return [Stage("high", high, None, save1), Stage("low", low, load2, save2),
            Stage("decode", dec, load3, None)]


def _save_latent(wf: Workflow, sampler: str, prefix: str) -> str:
    """Add a SaveLatent reading `sampler` to wf (in place); returns its id."""
    nid = _new_id(wf, "save_latent_")
    wf[nid] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
               "filename_prefix": prefix}, "_meta": {"title": "Save latent"}}
    return nid


def _from_loaded_latent(wf: Workflow, node: str, inp: str, root: str
                        ) -> tuple[Workflow, str]:
    """The part of wf that `root` needs once `node.inp` reads a LoadLatent instead."""
    out = copy.deepcopy(wf)
    load = _new_id(wf, "load_latent_")
    out[load] = {"class_type": "LoadLatent", "inputs": {"latent": ""},
                 "_meta": {"title": "Load latent"}}
    out[node]["inputs"][inp] = [load, 0]
    return {nid: out[nid] for nid in ancestors(out, [root])}, load
