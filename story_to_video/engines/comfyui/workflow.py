"""Workflows and bindings: load, check (offline and against /object_info), bind a shot.

A binding says which node input carries each shot field, so any API-format workflow
exported from ComfyUI can be driven without editing code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...models import Shot
from .errors import WorkflowError

Workflow = dict[str, dict[str, Any]]
Target = tuple[str, str]

BINDABLE = ("prompt", "negative_prompt", "seed", "frames", "width", "height", "fps",
            "start_image", "steps", "split_step", "lora_strength_high", "lora_strength_low",
            "filename_prefix", "blocks_to_swap")
MODELS = ("wan2.2-14b", "wan2.2-5b", "wan2.1-14b", "wan2.1-1.3b")
# A keyframe (text-to-image) workflow may use any model: "other", sized by `vram_gib`.
IMAGE_MODELS = (*MODELS, "other")
VIDEO_OUTPUT_CLASSES = ("SaveVideo", "SaveWEBM", "SaveAnimatedWEBP", "SaveAnimatedPNG",
                        "VHS_VideoCombine", "CreateVideo")
# What a bound input must hold in the workflow before binding (the value it replaces).
TEXT_INPUTS = ("prompt", "negative_prompt", "filename_prefix", "start_image")


class BindingNodes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decode: str
    output: str
    high_sampler: str | None = None
    low_sampler: str | None = None
    high_model: str | None = None
    low_model: str | None = None


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str
    model: str = Field(description=f"one of {MODELS}: sizes the broker's cost model")
    inputs: dict[str, list[Target]]
    nodes: BindingNodes
    # "image": a keyframe (text-to-image) workflow whose output node saves a still.
    output: Literal["video", "image"] = "video"
    # The start image's LoadImage node is cut out of the graph for a shot without one
    # (TI2V: text or image to video); otherwise every shot needs a start image.
    start_image_optional: bool = False
    vram_gib: float | None = Field(default=None, gt=0, le=1024,
                                   description="peak VRAM of a keyframe workflow's model "
                                   "when model = \"other\"")

    @model_validator(mode="after")
    def _model(self) -> Binding:
        allowed = IMAGE_MODELS if self.output == "image" else MODELS
        if self.model not in allowed:
            raise ValueError(f"model must be one of {', '.join(allowed)}")
        return self

    @field_validator("inputs", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, val in v.items():
            if key not in BINDABLE:
                raise ValueError(f"unknown input {key!r}; bindable: {', '.join(BINDABLE)}")
            single = (isinstance(val, list) and len(val) == 2
                      and all(isinstance(x, str) for x in val))
            out[key] = [val] if single else val
        return out

    @property
    def two_expert(self) -> bool:
        return self.nodes.high_sampler is not None and self.nodes.low_sampler is not None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise WorkflowError(f"{what} file {path} is a folder, not a file") from None
    except OSError as err:
        raise WorkflowError(f"{what} file {path} cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise WorkflowError(f"{what} file {path} is not UTF-8 text (byte {err.start})") from None


def load_workflow(path: Path) -> Workflow:
    text = _read_text(path, "workflow")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise WorkflowError(f"workflow {path} is not JSON: {err}") from None
    except RecursionError:
        raise WorkflowError(f"workflow {path} is JSON nested too deeply") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{path} is a UI-format workflow (it has 'nodes' and 'links'). Export the API "
            "format instead: in ComfyUI, Workflow menu > Export (API) (older versions: enable "
            "dev mode options in the settings, then 'Save (API Format)')."
        )
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs"), dict)
            for v in data.values()):
        raise WorkflowError(f"{path} is not an API-format workflow "
                            "({node id: {class_type, inputs}})")
    return data


def load_binding(path: Path) -> Binding:
    text = _read_text(path, "binding")
    try:
        raw = tomllib.loads(text)
        return Binding.model_validate(raw)
    except RecursionError:
        raise WorkflowError(f"binding {path} is TOML nested too deeply") from None
    except tomllib.TOMLDecodeError as err:
        raise WorkflowError(f"binding {path} is not valid TOML: {err}") from None
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                         for e in err.errors())
        raise WorkflowError(f"binding {path}: {msgs}") from None


@dataclass(frozen=True)
class BoundWorkflow:
    workflow: Workflow
    binding: Binding
    source: str

    @staticmethod
    def load(binding_file: Path, workflow_file: Path | None = None) -> BoundWorkflow:
        binding = load_binding(binding_file)
        wf_path = workflow_file or (binding_file.parent / binding.workflow)
        bw = BoundWorkflow(load_workflow(wf_path), binding, str(wf_path))
        problems = bw.offline_problems()
        if problems:
            raise WorkflowError(f"{wf_path} with {binding_file}: " + "; ".join(problems))
        return bw

    def fingerprint(self) -> str:
        raw = json.dumps([self.workflow, self.binding.model_dump()], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def offline_problems(self) -> list[str]:
        wf, out = self.workflow, []
        for node_id, spec in wf.items():
            if not isinstance(spec["class_type"], str) or not spec["class_type"].strip():
                out.append(f"node {node_id}: class_type must be a class name, got "
                           f"{spec['class_type']!r}")
        for name, targets in self.binding.inputs.items():
            for node, inp in targets:
                if node not in wf:
                    out.append(f"binding {name}: node {node} is not in the workflow")
                elif inp not in wf[node]["inputs"]:
                    out.append(f"binding {name}: node {node} ({wf[node]['class_type']}) has "
                               f"no input {inp!r}")
                else:
                    out += _bound_value_problems(name, node, inp, wf[node]["inputs"][inp])
        for role, nid in self.binding.nodes.model_dump().items():
            if nid is not None and nid not in wf:
                out.append(f"binding nodes.{role}: node {nid} is not in the workflow")
        out += _link_problems(wf)
        needed = ("prompt", "seed", "width", "height") if self.binding.output == "image" \
            else ("prompt", "seed", "frames", "width", "height")
        for field in needed:
            if field not in self.binding.inputs:
                out.append(f"binding has no {field!r} input: the shot's {field} cannot be set")
        return out

    def keyframe_problems(self) -> list[str]:
        """What keeps this workflow from making keyframes: it must save a still image."""
        out_node = self.workflow.get(self.binding.nodes.output, {})
        cls = out_node.get("class_type", "")
        if self.binding.output != "image":
            return ['a keyframe workflow\'s binding must say output = "image" and name its '
                    "image output node (e.g. SaveImage) as nodes.output"]
        if cls in VIDEO_OUTPUT_CLASSES:
            return [f"nodes.output {self.binding.nodes.output} is {cls}, which saves a video; "
                    "a keyframe workflow needs an image output node (e.g. SaveImage)"]
        return []

    def online_problems(self, object_info: dict[str, Any]) -> list[str]:
        """Checks against a live ComfyUI: classes exist, inputs exist, model files exist."""
        out = []
        bound = {t for ts in self.binding.inputs.values() for t in ts}
        for node_id, node in self.workflow.items():
            cls = node["class_type"]
            info = object_info.get(cls)
            if info is None:
                out.append(f"node {node_id}: class {cls!r} is not installed in ComfyUI "
                           "(missing custom node?)")
                continue
            spec = {**info.get("input", {}).get("required", {}),
                    **info.get("input", {}).get("optional", {})}
            for inp, val in node["inputs"].items():
                if inp not in spec:
                    if (node_id, inp) in bound:
                        out.append(f"node {node_id} ({cls}) has no input {inp!r} in this "
                                   "ComfyUI")
                    continue
                options = _combo_options(spec[inp])
                if (options is not None and not _is_link(val) and (node_id, inp) not in bound
                        and val not in options):
                    shown = ", ".join(map(str, options[:6])) or "none"
                    out.append(f"node {node_id} ({cls}): {inp}={val!r} is not available; "
                               f"ComfyUI has: {shown}")
        return out

    def bind(self, shot: Shot, **extra: Any) -> Workflow:
        """A new workflow with the shot's values in the bound inputs (the original is kept)."""
        values: dict[str, Any] = {
            "prompt": shot.prompt, "negative_prompt": shot.negative_prompt,
            "seed": shot.seed, "frames": shot.frames, "width": shot.width,
            "height": shot.height, "fps": shot.fps,
            "filename_prefix": f"story-to-video/{shot.id}",
        }
        values.update({k: v for k, v in extra.items() if v is not None})
        wf = copy.deepcopy(self.workflow)
        for name, value in values.items():
            for node, inp in self.binding.inputs.get(name, []):
                wf[node]["inputs"][inp] = value
        return wf


def _is_link(val: Any) -> bool:
    return (isinstance(val, list) and len(val) == 2 and isinstance(val[1], int)
            and not isinstance(val[1], bool))


def _bound_value_problems(name: str, node: str, inp: str, value: Any) -> list[str]:
    """A bound input replaces a value of its kind; a link there would be cut out of the
    graph, and a value of another type means the binding points at the wrong input."""
    where = f"binding {name}: node {node} input {inp!r}"
    if _is_link(value):
        return [f"{where} is a link to node {value[0]}; a bound input must hold a value"]
    if name in TEXT_INPUTS:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    kind = "text" if name in TEXT_INPUTS else "a number"
    return [] if ok else [f"{where} holds {value!r}, not {kind}"]


def _link_problems(wf: Workflow) -> list[str]:
    """Links must point at existing nodes' outputs, and never in a circle (ComfyUI would
    refuse the prompt, or wait forever)."""
    out: list[str] = []
    sources: dict[str, list[str]] = {}
    for node_id, spec in wf.items():
        for inp, val in spec["inputs"].items():
            if not _is_link(val):
                continue
            src = str(val[0])
            if src not in wf:
                out.append(f"node {node_id} input {inp} links to missing node {val[0]}")
            elif val[1] < 0:
                out.append(f"node {node_id} input {inp} links to output {val[1]} of node "
                           f"{src}; outputs count from 0")
            else:
                sources.setdefault(node_id, []).append(src)
    cycle = _find_cycle(list(wf), sources)
    if cycle:
        out.append("links form a cycle: " + " -> ".join(cycle))
    return out


def _find_cycle(nodes: list[str], sources: dict[str, list[str]]) -> list[str]:
    """One cycle in the link graph (as node ids, first repeated last), or [] (iterative
    depth-first search: a hostile workflow cannot exhaust the stack)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in nodes:
        if root in state:
            continue
        path, stack = [root], [iter(sources.get(root, []))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sources.get(nxt, [])))
    return []


def _combo_options(spec: Any) -> list[Any] | None:
    """Options of a COMBO input in /object_info (old form: [[...]], new: ["COMBO", {options}])."""
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            return list(spec[0])
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            opts = spec[1].get("options")
            return list(opts) if isinstance(opts, list) else None
    return None
