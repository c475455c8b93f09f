"""A fake ComfyUI that replays what the real 0.33 server was recorded doing.

Real HTTP + WebSocket on loopback (starlette + uvicorn). Its `/object_info` and
`/system_stats` are the real server's, recorded by scripts/record_comfyui_transcripts.py into
tests/fixtures/comfyui/; its validation errors, WebSocket sequences, `/history`, `/queue`
and `/free` follow those transcripts, and tests/test_comfyui_contract.py runs one set of
assertions against this fake and the real server so a divergence fails a test:

- POST /prompt validates like execution.py: `missing_node_type`, `prompt_no_outputs`,
  per-node `required_input_missing`, `invalid_input_type`, `value_smaller_than_min` /
  `value_bigger_than_max`, `value_not_in_list`, `return_type_mismatch`,
  `exception_during_inner_validation` (a dangling link), LoadImage's
  `custom_validation_failed`, each with `input_config`, `received_value` and the
  `dependent_outputs` filled.
- The WebSocket: `status` with the `sid` on connect, two `status` with queue_remaining when a
  prompt is queued, then execution_start, execution_cached, `progress_state` around every
  node, `executing`, `progress` for samplers, `executed` for output nodes (cached ones too),
  execution_success, `status`, and `executing` with node None. No binary previews.
- Caching: "ram" (0.33's default) keeps every output; "classic" keeps only the outputs of
  nodes that the next prompt has too. `/free` answers 200 with an empty body and only sets
  flags that the worker applies between prompts: unload_models keeps the cache,
  free_memory resets it.
Faults can be injected: stall, crash, OOM, dropped socket, death during a latent upload.
It lives in tests/ and never ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from story_to_video.llm.embedded import free_port
from tests.served import Served

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
OBJECT_INFO: dict[str, Any] = json.loads((FIXTURES / "object_info.json").read_text())
SYSTEM_STATS: dict[str, Any] = json.loads((FIXTURES / "system_stats.json").read_text())
SAMPLERS = ("KSampler", "KSamplerAdvanced")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)


def _options(spec: Any) -> list[Any] | None:
    """Combo options in any of the three forms /object_info uses."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1:
        return list(spec[1].get("options", []))
    if spec[0] == "COMFY_DYNAMICCOMBO_V3" and len(spec) > 1:
        return [o["key"] for o in spec[1].get("options", [])]
    return None


@dataclass
class Faults:
    stall_at: str | None = None  # class_type where execution stops sending anything
    oom_at: str | None = None  # class_type that raises torch.OutOfMemoryError
    crash_at: str | None = None  # class_type at which the whole server dies
    drop_socket_at: str | None = None  # class_type at which the socket is closed once
    die_on_latent_upload: bool = False  # the process dies while a .latent is uploaded
    step_delay_s: float = 0.005


@dataclass
class FakeComfyUI:
    port: int = field(default_factory=free_port)
    faults: Faults = field(default_factory=Faults)
    cache_mode: str = "ram"  # "ram" (0.33 default) or "classic"
    device: str = "cuda"  # "cuda" (a 32 GiB card) or "cpu" (reports RAM, like the real one)
    argv: list[str] = field(default_factory=lambda: ["main.py", "--listen", "127.0.0.1"])
    history: dict[str, Any] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    free_calls: list[dict[str, Any]] = field(default_factory=list)
    interrupts: int = 0
    model_loads: list[str] = field(default_factory=list)  # each weights transfer to the GPU

    def __post_init__(self) -> None:
        self.loaded: set[str] = set()  # model management: loaded on use, unloaded by /free
        self.sockets: dict[str, WebSocket] = {}
        self.cache: dict[str, Any] = {}  # signature -> outputs (ui) of a node
        self.files: dict[str, bytes] = {}
        self.flags: dict[str, bool] = {}
        self.number = 0
        self.pending: list[list[Any]] = []
        self.running: list[Any] | None = None
        self._interrupt = asyncio.Event()
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], str]] | None = None
        self.served: Served | None = None
        self.last_node: str | None = None
        self.running_client: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeComfyUI:
        app = Starlette(routes=[
            Route("/system_stats", self.system_stats),
            Route("/object_info", self.object_info),
            Route("/object_info/{cls}", self.object_info_one),
            Route("/prompt", self.post_prompt, methods=["POST"]),
            Route("/queue", self.get_queue),
            Route("/history/{prompt_id}", self.get_history),
            Route("/view", self.view),
            Route("/upload/image", self.upload, methods=["POST"]),
            Route("/free", self.free, methods=["POST"]),
            Route("/interrupt", self.interrupt, methods=["POST"]),
            WebSocketRoute("/ws", self.ws),
        ], lifespan=self._lifespan)
        self.served = Served(app, self.port, what="fake ComfyUI", ws="websockets-sansio",
                             lifespan="on")
        return self

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._queue = asyncio.Queue()
        self._interrupt = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(self._worker())
        yield
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    def stop(self) -> None:
        if self.served is not None:
            self.served.stop()

    # -- HTTP ------------------------------------------------------------------------------
    async def system_stats(self, _: Request) -> JSONResponse:
        stats = copy.deepcopy(SYSTEM_STATS)
        stats["system"]["argv"] = list(self.argv)
        dev = stats["devices"][0]
        if self.device == "cuda":
            dev.update(name="cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync", type="cuda",
                       index=0, vram_total=32 * 2**30, vram_free=30 * 2**30,
                       torch_vram_total=0, torch_vram_free=0)
        return JSONResponse(stats)

    def _object_info(self) -> dict[str, Any]:
        """Like ComfyUI, file combos list what is in the input folder now (uploads too)."""
        info = copy.deepcopy(OBJECT_INFO)
        names = [k.lstrip("/") for k in self.uploads]
        info["LoadImage"]["input"]["required"]["image"][0] = sorted(
            n for n in names if n.lower().endswith(IMAGE_SUFFIXES))
        info["LoadLatent"]["input"]["required"]["latent"][0] = sorted(
            n for n in names if n.endswith(".latent"))
        return info

    async def object_info(self, _: Request) -> JSONResponse:
        return JSONResponse(self._object_info())

    async def object_info_one(self, request: Request) -> JSONResponse:
        cls = request.path_params["cls"]
        info = self._object_info()
        return JSONResponse({cls: info[cls]} if cls in info else {})

    async def get_queue(self, _: Request) -> JSONResponse:
        return JSONResponse({"queue_running": [self.running] if self.running else [],
                             "queue_pending": list(self.pending)})

    async def get_history(self, request: Request) -> JSONResponse:
        pid = request.path_params["prompt_id"]
        return JSONResponse({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request: Request) -> Response:
        q = request.query_params
        name = q.get("filename", "")
        if not name or name[0] == "/" or ".." in name:
            return Response(status_code=400)
        key = f"{q.get('type', 'output')}/{q.get('subfolder', '')}/{name}"
        if key not in self.files:
            return Response(status_code=404)
        return Response(self.files[key], media_type="application/octet-stream")

    async def upload(self, request: Request) -> JSONResponse:
        form = await request.form()
        image = form["image"]
        assert not isinstance(image, str)
        if self.faults.die_on_latent_upload and str(image.filename).endswith(".latent"):
            os._exit(1)  # run as its own process (fake_comfyui_main): dies mid-request
        data = await image.read()
        sub = str(form.get("subfolder", ""))
        self.uploads[f"{sub}/{image.filename}" if sub else str(image.filename)] = data
        return JSONResponse({"name": image.filename, "subfolder": sub,
                             "type": form.get("type", "input")})

    async def free(self, request: Request) -> Response:
        body = await request.json()
        self.free_calls.append(body)
        for flag in ("unload_models", "free_memory"):
            if body.get(flag):
                self.flags[flag] = True
        self._wake.set()  # like PromptQueue.set_flag: the idle worker acts on it now
        return Response(status_code=200)

    async def interrupt(self, _: Request) -> Response:
        self.interrupts += 1
        self._interrupt.set()
        return Response(status_code=200)

    async def post_prompt(self, request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return JSONResponse({"error": {"type": "no_prompt", "message": "No prompt provided",
                                           "details": "No prompt provided", "extra_info": {}},
                                 "node_errors": {}}, status_code=400)
        error = self._validate(prompt)
        if error is not None:
            return JSONResponse(error, status_code=400)
        pid = str(uuid.uuid4())
        number = self.number
        self.number += 1
        self.prompts.append(prompt)
        sid = str(body.get("client_id", ""))
        outputs = [n for n in prompt if OBJECT_INFO[prompt[n]["class_type"]]["output_node"]]
        self.pending.append([number, pid, prompt, {"client_id": sid,
                                                   "create_time": int(time.time() * 1000)},
                             outputs])
        await self._broadcast_status(len(self.pending) + (1 if self.running else 0))
        assert self._queue is not None
        await self._queue.put((pid, prompt, sid))
        return JSONResponse({"prompt_id": pid, "number": number, "node_errors": {}})

    # -- validation (execution.py: validate_prompt / validate_inputs) -----------------------
    def _validate(self, prompt: dict[str, Any]) -> dict[str, Any] | None:
        info = self._object_info()
        for nid, node in prompt.items():
            if node.get("class_type") not in info:
                title = (node.get("_meta") or {}).get("title") or node.get("class_type")
                return {"error": {"type": "missing_node_type",
                                  "message": f"Node '{title}' not found. The custom node may "
                                             "not be installed.",
                                  "details": f"Node ID '#{nid}'",
                                  "extra_info": {"node_id": nid,
                                                 "class_type": node.get("class_type"),
                                                 "node_title": title}},
                        "node_errors": {}}
        outputs = [n for n in prompt if info[prompt[n]["class_type"]]["output_node"]]
        if not outputs:
            return {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                              "details": "", "extra_info": {}}, "node_errors": {}}
        node_errors = {}
        for nid in prompt:
            errors = self._node_errors(prompt, nid, info)
            if errors:
                deps = [o for o in outputs if nid in self._ancestors(prompt, o)]
                node_errors[nid] = {"errors": errors, "dependent_outputs": deps,
                                    "class_type": prompt[nid]["class_type"]}
        if node_errors:
            return {"error": {"type": "prompt_outputs_failed_validation",
                              "message": "Prompt outputs failed validation", "details": "",
                              "extra_info": {}}, "node_errors": node_errors}
        return None

    def _node_errors(self, prompt: dict[str, Any], nid: str, info: dict[str, Any]
                     ) -> list[dict[str, Any]]:
        node = prompt[nid]
        spec = info[node["class_type"]]["input"]
        errors: list[dict[str, Any]] = []

        def err(kind: str, message: str, details: str, **extra: Any) -> None:
            errors.append({"type": kind, "message": message, "details": details,
                           "extra_info": extra})

        every = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in spec.get("required", {}):
            if name not in node["inputs"]:
                err("required_input_missing", "Required input is missing", name,
                    input_name=name)
        for name, val in node["inputs"].items():
            conf = every.get(name)
            if conf is None:
                continue  # ComfyUI ignores inputs it does not know
            kind = conf[0] if isinstance(conf[0], str) else "COMBO"
            if _is_link(val):
                src = prompt.get(str(val[0]))
                if src is None:
                    err("exception_during_inner_validation",
                        "Exception when validating inner node", repr(str(val[0])),
                        input_name=name, input_config=conf,
                        exception_message=repr(str(val[0])), exception_type="KeyError",
                        linked_node=val)
                    continue
                got = info.get(src["class_type"], {}).get("output", [])[val[1]:val[1] + 1]
                if got and kind not in ("*", got[0]) and kind != "COMBO":
                    err("return_type_mismatch", "Return type mismatch between linked nodes",
                        f"{name}, received_type({got[0]}) mismatch input_type({kind})",
                        input_name=name, input_config=conf, received_type=got[0],
                        linked_node=val)
                continue
            errors.extend(self._value_errors(node, name, val, kind, conf))
        return errors

    @staticmethod
    def _value_errors(node: dict[str, Any], name: str, val: Any, kind: str, conf: Any
                      ) -> list[dict[str, Any]]:
        opts = conf[1] if len(conf) > 1 and isinstance(conf[1], dict) else {}
        if kind in ("INT", "FLOAT"):
            try:
                num = int(val) if kind == "INT" else float(val)
            except (TypeError, ValueError) as exc:
                return [{"type": "invalid_input_type",
                         "message": f"Failed to convert an input value to a {kind} value",
                         "details": f"{name}, {val}, {exc}",
                         "extra_info": {"input_name": name, "input_config": conf,
                                        "received_value": val,
                                        "exception_message": str(exc)}}]
            for bound, word, bad in (("min", "smaller", num < opts.get("min", num)),
                                     ("max", "bigger", num > opts.get("max", num))):
                if bad:
                    return [{"type": f"value_{word}_than_{bound}",
                             "message": f"Value {val} {word} than {bound} of {opts[bound]}",
                             "details": name,
                             "extra_info": {"input_name": name, "input_config": conf,
                                            "received_value": val}}]
            return []
        choices = _options(conf)
        if node["class_type"] == "LoadImage" and name == "image":
            if choices is None or val not in choices:
                return [{"type": "custom_validation_failed",
                         "message": "Custom validation failed for node",
                         "details": f"image - Invalid image file: {val}",
                         "extra_info": {"input_name": "image"}}]
            return []
        if choices is not None and kind != "COMFY_DYNAMICCOMBO_V3" and val not in choices:
            return [{"type": "value_not_in_list", "message": "Value not in list",
                     "details": f"{name}: '{val}' not in {choices}",
                     "extra_info": {"input_name": name, "input_config": conf,
                                    "received_value": val}}]
        return []

    @staticmethod
    def _ancestors(prompt: dict[str, Any], root: str) -> set[str]:
        seen: set[str] = set()
        stack = [root]
        while stack:
            nid = stack.pop()
            if nid in seen or nid not in prompt:
                continue
            seen.add(nid)
            stack += [str(v[0]) for v in prompt[nid]["inputs"].values() if _is_link(v)]
        return seen

    # -- WebSocket -------------------------------------------------------------------------
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = websocket
        remaining = len(self.pending) + (1 if self.running else 0)
        await self._send(sid, "status", {"status": {"exec_info": {
            "queue_remaining": remaining}}, "sid": sid})
        if self.running_client == sid and self.last_node is not None:
            await self._send(sid, "executing", {"node": self.last_node})
        try:
            while True:
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.sockets.get(sid) is websocket:
                self.sockets.pop(sid, None)

    async def _send(self, sid: str, kind: str, data: dict[str, Any]) -> None:
        ws = self.sockets.get(sid)
        if ws is not None:
            with contextlib.suppress(Exception):  # ComfyUI logs and carries on, too
                await ws.send_text(json.dumps({"type": kind, "data": data}))

    async def _broadcast_status(self, remaining: int) -> None:
        for sid in list(self.sockets):
            await self._send(sid, "status", {"status": {"exec_info": {
                "queue_remaining": remaining}}})

    # -- execution -------------------------------------------------------------------------
    def _keys(self, prompt: dict[str, Any]) -> dict[str, str]:
        """Input signatures (CacheKeySetInputSignature): class, constants and ancestors;
        LoadLatent/LoadImage also hash their file, as their IS_CHANGED does."""
        keys: dict[str, str] = {}

        def key(nid: str) -> str:
            if nid not in keys:
                node = prompt[nid]
                parts = {k: (key(str(v[0])) + f":{v[1]}" if _is_link(v) else v)
                         for k, v in node["inputs"].items()}
                if node["class_type"] in ("LoadLatent", "LoadImage"):
                    name = str(next(iter(node["inputs"].values()), ""))
                    parts["_file"] = hashlib.sha256(self.uploads.get(name, b"")).hexdigest()
                raw = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
                keys[nid] = hashlib.sha256(raw.encode()).hexdigest()
            return keys[nid]

        for nid in prompt:
            key(nid)
        return keys

    def _order(self, prompt: dict[str, Any]) -> list[str]:
        done: list[str] = []

        def visit(nid: str) -> None:
            if nid in done:
                return
            for v in prompt[nid]["inputs"].values():
                if _is_link(v):
                    visit(str(v[0]))
            done.append(nid)

        for nid in prompt:
            visit(nid)
        return done

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            self._apply_flags()  # main.py's prompt_worker: flags between prompts
            get = asyncio.ensure_future(self._queue.get())
            wake = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait({get, wake}, return_when=asyncio.FIRST_COMPLETED)
            self._wake.clear()
            if get not in done:
                get.cancel()
                continue
            wake.cancel()
            pid, prompt, sid = get.result()
            self.running = self.pending.pop(0)
            await self._broadcast_status(len(self.pending) + 1)  # PromptQueue.get() does
            self._interrupt.clear()
            self.running_client = sid
            try:
                await self._execute(pid, prompt, sid)
            finally:
                self.running, self.running_client, self.last_node = None, None, None
            await self._broadcast_status(len(self.pending))
            await self._send(sid, "executing", {"node": None, "prompt_id": pid})

    def _apply_flags(self) -> None:
        if self.flags.pop("unload_models", False) or self.flags.get("free_memory"):
            self.loaded.clear()
        if self.flags.pop("free_memory", False):
            self.cache.clear()  # ComfyUI resets its executor (and cache) on free_memory

    async def _execute(self, pid: str, prompt: dict[str, Any], sid: str) -> None:
        messages: list[list[Any]] = []
        state: dict[str, dict[str, Any]] = {}

        async def emit(kind: str, data: dict[str, Any]) -> None:
            if kind in ("execution_start", "execution_cached", "execution_success",
                        "execution_error", "execution_interrupted"):
                messages.append([kind, data])
            await self._send(sid, kind, data)

        async def progress_state(nid: str, value: float, status: str) -> None:
            state[nid] = {"value": value, "max": 1.0, "state": status, "node_id": nid,
                          "prompt_id": pid, "display_node_id": nid, "parent_node_id": None,
                          "real_node_id": nid}
            await emit("progress_state", {"prompt_id": pid, "nodes": copy.deepcopy(state)})

        now = lambda: int(time.time() * 1000)  # noqa: E731
        await emit("execution_start", {"prompt_id": pid, "timestamp": now()})
        keys = self._keys(prompt)
        if self.cache_mode == "classic":  # clean_unused: keep only what this prompt can use
            self.cache = {k: v for k, v in self.cache.items() if k in keys.values()}
        cached = [nid for nid in prompt if keys[nid] in self.cache]
        await emit("execution_cached", {"nodes": cached, "prompt_id": pid,
                                        "timestamp": now()})
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        for nid in cached:  # cached output nodes still report their output
            if OBJECT_INFO[prompt[nid]["class_type"]]["output_node"] and self.cache[keys[nid]]:
                outputs[nid] = self.cache[keys[nid]]
                await emit("executed", {"node": nid, "display_node": nid,
                                        "output": outputs[nid], "prompt_id": pid})
        for nid in self._order(prompt):
            if nid in cached:
                continue
            cls = prompt[nid]["class_type"]
            self.last_node = nid
            await progress_state(nid, 0.0, "running")
            await emit("executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            failure = await self._faults_at(nid, cls, sid, pid, executed, emit)
            if failure is None:
                failure = self._load_error(prompt, nid, pid, executed)
            if failure is not None:
                await emit(*failure)
                self._finish(pid, prompt, outputs, messages, "error")
                return
            if cls in SAMPLERS:
                self._load_model(prompt, nid)
                steps = int(prompt[nid]["inputs"].get("steps", 4))
                start = int(prompt[nid]["inputs"].get("start_at_step", 0))
                end = min(steps, int(prompt[nid]["inputs"].get("end_at_step", steps)))
                for step in range(1, max(1, end - start) + 1):
                    await asyncio.sleep(self.faults.step_delay_s)
                    await emit("progress", {"value": step, "max": max(1, end - start),
                                            "prompt_id": pid, "node": nid})
            ui = self._run_output_node(prompt, nid, keys[nid])
            if ui is not None:
                outputs[nid] = ui
                await emit("executed", {"node": nid, "display_node": nid, "output": ui,
                                        "prompt_id": pid})
            await progress_state(nid, 1.0, "finished")
            self.cache[keys[nid]] = ui
            executed.append(nid)
        await emit("execution_success", {"prompt_id": pid, "timestamp": now()})
        self._finish(pid, prompt, outputs, messages, "success")

    async def _faults_at(self, nid: str, cls: str, sid: str, pid: str, executed: list[str],
                         emit: Any) -> tuple[str, dict[str, Any]] | None:
        now = int(time.time() * 1000)
        if cls == self.faults.crash_at:
            self.stop_soon()
            await asyncio.sleep(3600)
        if cls == self.faults.drop_socket_at and sid in self.sockets:
            self.faults.drop_socket_at = None
            await self.sockets.pop(sid).close()
        if cls == self.faults.stall_at:
            self.faults.stall_at = None
            await self._interrupt.wait()
            return ("execution_interrupted", {"prompt_id": pid, "node_id": nid,
                                              "node_type": cls, "executed": executed,
                                              "timestamp": now})
        if cls == self.faults.oom_at:
            return ("execution_error", {
                "prompt_id": pid, "node_id": nid, "node_type": cls, "executed": executed,
                "exception_message": "Allocation on device 0 would exceed allowed memory."
                                     " (out of memory)\nCurrently allocated     : 29.10 GiB",
                "exception_type": "torch.OutOfMemoryError",
                "traceback": ["  File \"execution.py\", line 545, in execute\n"],
                "current_inputs": {}, "current_outputs": {}, "timestamp": now})
        return None

    def _load_error(self, prompt: dict[str, Any], nid: str, pid: str, executed: list[str]
                    ) -> tuple[str, dict[str, Any]] | None:
        """LoadLatent of a file that is not a latent fails like safetensors does."""
        node = prompt[nid]
        if node["class_type"] != "LoadLatent":
            return None
        try:
            json.loads(self.uploads.get(node["inputs"]["latent"], b""))
        except ValueError:
            return ("execution_error", {
                "prompt_id": pid, "node_id": nid, "node_type": "LoadLatent",
                "executed": executed,
                "exception_message": "Error while deserializing header: header too large\n",
                "exception_type": "safetensors._safetensors_rust.SafetensorError",
                "traceback": ["  File \"execution.py\", line 545, in execute\n"],
                "current_inputs": {}, "current_outputs": {},
                "timestamp": int(time.time() * 1000)})
        return None

    def _load_model(self, prompt: dict[str, Any], nid: str) -> None:
        model = self._model_of(prompt, nid)
        if model not in self.loaded:  # ComfyUI loads the weights on first use
            self.loaded.add(model)
            self.model_loads.append(model)

    def _run_output_node(self, prompt: dict[str, Any], nid: str, key: str
                         ) -> dict[str, Any] | None:
        cls = prompt[nid]["class_type"]
        if cls == "SaveLatent":
            prefix = str(prompt[nid]["inputs"].get("filename_prefix", "latents/ComfyUI"))
            sub, _, stem = prefix.rpartition("/")
            name = f"{stem}_{len(self.files) + 1:05d}_.latent"
            # a real latent holds its shape; this one holds the video it will decode to
            frames, width, height, _ = self._video_params(prompt, nid)
            self.files[f"output/{sub}/{name}"] = json.dumps(  # differs with seed and prompt
                {"frames": frames, "width": width, "height": height, "of": key}).encode()
            return {"latents": [{"filename": name, "subfolder": sub, "type": "output"}]}
        if cls == "SaveVideo":
            return {"images": [self._save_video(prompt, nid)], "animated": [True]}
        return None

    def _model_of(self, prompt: dict[str, Any], nid: str) -> str:
        node = prompt[nid]
        while node["class_type"] != "UNETLoader":
            link = node["inputs"].get("model")
            if not _is_link(link):
                return "?"
            node = prompt[str(link[0])]
        return str(node["inputs"]["unet_name"])

    def _finish(self, pid: str, prompt: dict[str, Any], outputs: dict[str, Any],
                messages: list[list[Any]], status: str) -> None:
        running = self.running or [self.number, pid, prompt, {}, []]
        self.history[pid] = {
            "prompt": running,
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success",
                       "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None,
                         "real_node_id": n} for n in outputs},
        }

    def _video_params(self, prompt: dict[str, Any], save_id: str) -> tuple[int, int, int, int]:
        frames, width, height, fps = 17, 64, 64, 16
        for node in prompt.values():
            ins = node["inputs"]
            if node["class_type"] == "LoadLatent":
                shape = json.loads(self.uploads[ins["latent"]])
                frames, width, height = shape["frames"], shape["width"], shape["height"]
            if "length" in ins and "width" in ins:
                frames, width, height = int(ins["length"]), int(ins["width"]),\
                    int(ins["height"])
            if node["class_type"] == "CreateVideo":
                fps = int(ins["fps"])
        return frames, width, height, fps

    def _save_video(self, prompt: dict[str, Any], nid: str) -> dict[str, str]:
        frames, width, height, fps = self._video_params(prompt, nid)
        prefix = str(prompt[nid]["inputs"].get("filename_prefix", "ComfyUI"))
        sub, _, stem = prefix.rpartition("/")
        name = f"{stem}_{len(self.files) + 1:05d}_.mp4"
        self.files[f"output/{sub}/{name}"] = encode_mp4(frames, width, height, fps)
        return {"filename": name, "subfolder": sub, "type": "output"}

    def stop_soon(self) -> None:
        """Simulate ComfyUI dying: drop every socket and stop answering."""
        threading.Thread(target=self.stop, daemon=True).start()


def encode_mp4(frames: int, width: int, height: int, fps: int) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.mp4"
        writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps,
                                             codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=16)
        writer.send(None)
        for i in range(frames):
            writer.send(np.full((height, width, 3), (i * 7) % 256, dtype=np.uint8).tobytes())
        writer.close()
        return path.read_bytes()
