"""A protocol-faithful fake ComfyUI: real HTTP + WebSocket on loopback (starlette + uvicorn).

It follows ComfyUI's server.py and execution.py: POST /prompt validates the graph against
/object_info and answers 400 with `node_errors` like ComfyUI; execution is announced on
/ws?clientId= with status, execution_start, execution_cached, executing, progress (plus
binary preview frames), executed, execution_success and a final executing(node=None);
/history/{id} holds outputs and status messages; /view serves a real mp4; /free with
free_memory resets the cache. Faults can be injected: stall, crash, OOM, dropped socket.
It lives in tests/ and never ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from story_to_video.llm.embedded import free_port

OBJECT_INFO: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "object_info.json").read_text())


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)


@dataclass
class Faults:
    stall_at: str | None = None  # class_type where execution stops sending anything
    oom_at: str | None = None  # class_type that raises torch.OutOfMemoryError
    crash_at: str | None = None  # class_type at which the whole server dies
    drop_socket_at: str | None = None  # class_type at which the socket is closed once
    step_delay_s: float = 0.005


@dataclass
class FakeComfyUI:
    port: int = field(default_factory=free_port)
    faults: Faults = field(default_factory=Faults)
    history: dict[str, Any] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    free_calls: list[dict[str, Any]] = field(default_factory=list)
    interrupts: int = 0
    model_loads: list[str] = field(default_factory=list)  # each weights transfer to the GPU

    def __post_init__(self) -> None:
        self.loaded: set[str] = set()  # model management: loaded on use, unloaded by /free
        self.sockets: dict[str, WebSocket] = {}
        self.cache: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.number = 0
        self._interrupt = asyncio.Event()
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], str]] | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
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
            Route("/prompt", self.post_prompt, methods=["POST"]),
            Route("/queue", self.get_queue),
            Route("/history/{prompt_id}", self.get_history),
            Route("/view", self.view),
            Route("/upload/image", self.upload, methods=["POST"]),
            Route("/free", self.free, methods=["POST"]),
            Route("/interrupt", self.interrupt, methods=["POST"]),
            WebSocketRoute("/ws", self.ws),
        ], lifespan=self._lifespan)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                ws="websockets-sansio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake ComfyUI did not start")
            time.sleep(0.02)
        return self

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._queue = asyncio.Queue()
        self._interrupt = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(self._worker())
        yield
        worker.cancel()

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.server.force_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- HTTP ------------------------------------------------------------------------------
    async def system_stats(self, _: Request) -> JSONResponse:
        return JSONResponse({
            "system": {"os": "posix", "ram_total": 128 * 2**30, "ram_free": 100 * 2**30,
                       "comfyui_version": "0.3.60", "python_version": "3.11.7",
                       "pytorch_version": "2.8.0+cu128", "embedded_python": False,
                       "argv": ["main.py", "--listen", "127.0.0.1"]},
            "devices": [{"name": "cuda:0 NVIDIA GeForce RTX 5090 : cudaMallocAsync",
                         "type": "cuda", "index": 0, "vram_total": 32 * 2**30,
                         "vram_free": 30 * 2**30, "torch_vram_total": 0,
                         "torch_vram_free": 0}]})

    async def object_info(self, _: Request) -> JSONResponse:
        return JSONResponse(OBJECT_INFO)

    async def get_queue(self, _: Request) -> JSONResponse:
        return JSONResponse({"queue_running": [], "queue_pending": []})

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
        return Response(self.files[key], media_type="video/mp4")

    async def upload(self, request: Request) -> JSONResponse:
        form = await request.form()
        image = form["image"]
        assert not isinstance(image, str)
        data = await image.read()
        sub = str(form.get("subfolder", ""))
        self.uploads[f"{sub}/{image.filename}"] = data
        return JSONResponse({"name": image.filename, "subfolder": sub,
                             "type": form.get("type", "input")})

    async def free(self, request: Request) -> Response:
        body = await request.json()
        self.free_calls.append(body)
        if body.get("unload_models") or body.get("free_memory"):
            self.loaded.clear()
        if body.get("free_memory"):
            self.cache.clear()  # ComfyUI resets its executor (and cache) on free_memory
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
                                           "details": "", "extra_info": {}},
                                 "node_errors": {}}, status_code=400)
        error = self._validate(prompt)
        if error is not None:
            return JSONResponse(error, status_code=400)
        pid = str(uuid.uuid4())
        self.number += 1
        self.prompts.append(prompt)
        assert self._queue is not None
        await self._queue.put((pid, prompt, str(body.get("client_id", ""))))
        return JSONResponse({"prompt_id": pid, "number": self.number, "node_errors": {}})

    def _input_files(self) -> list[str]:
        """Like ComfyUI, file combos list what is in the input folder now (uploads too)."""
        return [k.lstrip("/") for k in self.uploads]

    def _validate(self, prompt: dict[str, Any]) -> dict[str, Any] | None:
        for nid, node in prompt.items():
            if node.get("class_type") not in OBJECT_INFO:
                return {"error": {"type": "invalid_prompt",
                                  "message": f"Cannot execute because node "
                                             f"{node.get('class_type')} does not exist.",
                                  "details": f"Node ID '#{nid}'", "extra_info": {}},
                        "node_errors": {}}
        node_errors = {}
        for nid, node in prompt.items():
            spec = OBJECT_INFO[node["class_type"]]["input"]
            errors = []
            if node["class_type"] == "LoadLatent" and \
                    node["inputs"].get("latent") not in self._input_files():
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"latent: '{node['inputs'].get('latent')}' not in "
                                          f"{self._input_files()}",
                               "extra_info": {"input_name": "latent"}})
            for name, info in spec.get("required", {}).items():
                val = node["inputs"].get(name)
                if val is None:
                    errors.append({"type": "required_input_missing",
                                   "message": "Required input is missing", "details": name,
                                   "extra_info": {"input_name": name}})
                elif isinstance(info[0], list) and info[0] and not _is_link(val) \
                        and val not in info[0] + self._input_files():
                    errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                   "details": f"{name}: '{val}' not in {info[0]}",
                                   "extra_info": {"input_name": name}})
            if errors:
                node_errors[nid] = {"errors": errors, "dependent_outputs": [],
                                    "class_type": node["class_type"]}
        if node_errors:
            return {"error": {"type": "prompt_outputs_failed_validation",
                              "message": "Prompt outputs failed validation", "details": "",
                              "extra_info": {}}, "node_errors": node_errors}
        return None

    # -- WebSocket -------------------------------------------------------------------------
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = websocket
        await self._send(sid, "status", {"status": {"exec_info": {"queue_remaining": 0}},
                                         "sid": sid})
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

    async def _send_preview(self, sid: str) -> None:
        ws = self.sockets.get(sid)
        if ws is not None:  # PREVIEW_IMAGE: 4-byte event type, 4-byte image type, JPEG bytes
            with contextlib.suppress(Exception):
                await ws.send_bytes(struct.pack(">I", 1) + struct.pack(">I", 1) + b"\xff\xd8")

    # -- execution -------------------------------------------------------------------------
    def _keys(self, prompt: dict[str, Any]) -> dict[str, str]:
        keys: dict[str, str] = {}

        def key(nid: str) -> str:
            if nid not in keys:
                node = prompt[nid]
                parts = {k: (key(str(v[0])) + f":{v[1]}" if _is_link(v) else v)
                         for k, v in node["inputs"].items()}
                raw = json.dumps([node["class_type"], parts], sort_keys=True)
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
            pid, prompt, sid = await self._queue.get()
            self._interrupt.clear()
            self.running_client = sid
            try:
                await self._execute(pid, prompt, sid)
            except Exception as err:  # like ComfyUI: a node failure is an execution_error
                await self._send(sid, "execution_error", {
                    "prompt_id": pid, "node_id": self.last_node or "?",
                    "node_type": prompt.get(self.last_node or "", {}).get("class_type", "?"),
                    "executed": [], "exception_message": str(err),
                    "exception_type": type(err).__name__, "traceback": [],
                    "current_inputs": {}, "current_outputs": {}})
            finally:
                self.running_client, self.last_node = None, None

    async def _execute(self, pid: str, prompt: dict[str, Any], sid: str) -> None:
        messages: list[list[Any]] = []

        async def emit(kind: str, data: dict[str, Any]) -> None:
            if kind in ("execution_start", "execution_cached", "execution_success",
                        "execution_error", "execution_interrupted"):
                messages.append([kind, data])
            await self._send(sid, kind, data)

        now = lambda: int(time.time() * 1000)  # noqa: E731
        await emit("execution_start", {"prompt_id": pid, "timestamp": now()})
        keys = self._keys(prompt)
        cached = [nid for nid in prompt if keys[nid] in self.cache]
        await emit("execution_cached", {"nodes": cached, "prompt_id": pid,
                                        "timestamp": now()})
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        for nid in self._order(prompt):
            if nid in cached:
                continue
            cls = prompt[nid]["class_type"]
            self.last_node = nid
            await emit("executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            if cls == self.faults.crash_at:
                self.stop_soon()
                await asyncio.sleep(3600)
            if cls == self.faults.drop_socket_at and sid in self.sockets:
                self.faults.drop_socket_at = None
                await self.sockets.pop(sid).close()
            if cls == self.faults.stall_at:
                self.faults.stall_at = None
                await self._interrupt.wait()
                await emit("execution_interrupted", {"prompt_id": pid, "node_id": nid,
                                                     "node_type": cls, "executed": executed,
                                                     "timestamp": now()})
                self._finish(pid, prompt, outputs, messages, "error")
                return
            if cls == self.faults.oom_at:
                await emit("execution_error", {
                    "prompt_id": pid, "node_id": nid, "node_type": cls, "executed": executed,
                    "exception_message": "Allocation on device 0 would exceed allowed memory."
                                         " (out of memory)\nCurrently allocated     : 29.10 GiB",
                    "exception_type": "torch.OutOfMemoryError",
                    "traceback": ["  File \"execution.py\", line 496, in execute\n"],
                    "current_inputs": {}, "current_outputs": {}, "timestamp": now()})
                self._finish(pid, prompt, outputs, messages, "error")
                return
            if cls in ("KSampler", "KSamplerAdvanced"):
                model = self._model_of(prompt, nid)
                if model not in self.loaded:  # ComfyUI loads the weights on first use
                    self.loaded.add(model)
                    self.model_loads.append(model)
                steps = int(prompt[nid]["inputs"].get("steps", 4))
                for step in range(1, steps + 1):
                    await asyncio.sleep(self.faults.step_delay_s)
                    await emit("progress", {"value": step, "max": steps, "prompt_id": pid,
                                            "node": nid})
                    await self._send_preview(sid)
            if cls == "SaveLatent":
                prefix = str(prompt[nid]["inputs"].get("filename_prefix", "latents/ComfyUI"))
                sub, _, stem = prefix.rpartition("/")
                name = f"{stem}_{len(self.files) + 1:05d}_.latent"
                # a real latent holds its shape; this one holds the video it will decode to
                frames, width, height, _ = self._video_params(prompt, nid)
                self.files[f"output/{sub}/{name}"] = json.dumps(
                    {"frames": frames, "width": width, "height": height}).encode()
                outputs[nid] = {"latents": [{"filename": name, "subfolder": sub,
                                             "type": "output"}]}
                await emit("executed", {"node": nid, "display_node": nid,
                                        "output": outputs[nid], "prompt_id": pid})
            if cls == "SaveVideo":
                item = self._save_video(prompt, nid)
                outputs[nid] = {"images": [item], "animated": [True]}
                await emit("executed", {"node": nid, "display_node": nid,
                                        "output": outputs[nid], "prompt_id": pid})
            self.cache.add(keys[nid])
            executed.append(nid)
        for nid in cached:
            if prompt[nid]["class_type"] == "SaveVideo":
                outputs[nid] = self._cached_output(prompt, nid)
        await emit("execution_success", {"prompt_id": pid, "timestamp": now()})
        await emit("executing", {"node": None, "prompt_id": pid})
        self._finish(pid, prompt, outputs, messages, "success")

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
        self.history[pid] = {
            "prompt": [self.number, pid, prompt, {}, [n for n in prompt
                       if OBJECT_INFO[prompt[n]["class_type"]]["output_node"]]],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success",
                       "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n} for n in outputs},
        }

    def _video_params(self, prompt: dict[str, Any], save_id: str) -> tuple[int, int, int, int]:
        frames, width, height, fps = 17, 64, 64, 16
        for node in prompt.values():
            ins = node["inputs"]
            if node["class_type"] == "LoadLatent":
                shape = json.loads(self.uploads[f"/{ins['latent']}"])
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

    def _cached_output(self, prompt: dict[str, Any], nid: str) -> dict[str, Any]:
        for entry in reversed(list(self.history.values())):
            if nid in entry["outputs"]:
                out: dict[str, Any] = entry["outputs"][nid]
                return out
        return {}

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
