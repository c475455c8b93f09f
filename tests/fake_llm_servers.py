"""Protocol-faithful fakes of the LLM servers whose models the broker moves: real HTTP on
loopback (starlette + uvicorn), built from each server's documented API.

LM Studio, REST API v1 (LM Studio 0.4+), https://lmstudio.ai/docs/developer/rest:
  GET  /api/v1/models          (rest/list)   {"models": [{type, publisher, key, display_name,
                                              architecture, quantization, size_bytes,
                                              params_string, loaded_instances: [{id, config}],
                                              max_context_length, format}]}
  POST /api/v1/models/load     (rest/load)   {"model", context_length?, ...} ->
                                              {type, instance_id, load_time_seconds, status}
  POST /api/v1/models/unload   (rest/unload) {"instance_id"} -> {"instance_id"}
  The docs give no error body; an OpenAI-style {"error": {"message": ...}} is assumed.
  Its Python SDK (https://lmstudio.ai/docs/python/manage-models/loading,
  `client.llm.load_new_instance(key, config=...)`, config `gpu.ratio` as in `lms load --gpu`)
  talks to LM Studio over its own WebSocket protocol; `SdkStandIn` stands in for the SDK
  client at its documented Python interface and loads into the same fake state.

Ollama, docs/api.md (https://github.com/ollama/ollama/blob/main/docs/api.md):
  POST /api/generate {"model", "keep_alive": 0} with no prompt unloads ->
       {"model", "created_at", "response": "", "done": true, "done_reason": "unload"};
       with no prompt and no keep_alive 0 it loads -> {... "done": true};
       "options": {"num_gpu": n} sets the layers offloaded (docs/modelfile.md)
  GET  /api/ps   -> {"models": [{name, model, size, digest, details, expires_at, size_vram}]}
  POST /api/show {"model"} -> {..., "model_info": {"<arch>.block_count": n, ...}}
  errors: {"error": "..."}; an unknown model is 404 "model '<name>' not found".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from story_to_video.llm.embedded import free_port
from tests.served import Served

GIB = 2**30


@dataclass
class Faults:
    stall_unload_s: float = 0.0  # the unload call hangs this long
    unload_status: int = 0  # answer the unload with this HTTP error


class _Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.faults = Faults()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._served: Served | None = None

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def start(self) -> _Server:
        self._served = Served(Starlette(routes=self.routes()), self.port, what="fake server")
        return self

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()

    async def _body(self, request: Request) -> dict[str, Any]:
        body = await request.json() if await request.body() else {}
        self.requests.append((request.url.path, body))
        return dict(body)

    async def _faulty_unload(self) -> JSONResponse | None:
        if self.faults.stall_unload_s:
            await asyncio.sleep(self.faults.stall_unload_s)
        if self.faults.unload_status:
            return JSONResponse(self.error_body("internal error"),
                                status_code=self.faults.unload_status)
        return None

    def error_body(self, message: str) -> dict[str, Any]:
        return {"error": {"message": message}}


@dataclass
class LMModel:
    key: str
    size_bytes: int
    instances: list[dict[str, Any]] = field(default_factory=list)


class FakeLMStudio(_Server):
    def __init__(self, key: str = "qwen2.5-14b-instruct", size_gib: float = 12.0,
                 token: str | None = None) -> None:
        super().__init__()
        self.models = {key: LMModel(key, int(size_gib * GIB),
                                    [{"id": key, "config": {"context_length": 4096}}])}
        self.token = token
        self.ratios: dict[str, float | str] = {}  # instance id -> GPU ratio it was loaded with

    def routes(self) -> list[Route]:
        return [Route("/api/v1/models", self.list_models),
                Route("/api/v1/models/load", self.load, methods=["POST"]),
                Route("/api/v1/models/unload", self.unload, methods=["POST"])]

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
        return None

    async def list_models(self, request: Request) -> JSONResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"models": [
            {"type": "llm", "publisher": "lmstudio-community", "key": m.key,
             "display_name": m.key, "architecture": "qwen2",
             "quantization": {"name": "Q6_K", "bits_per_weight": 6.0},
             "size_bytes": m.size_bytes, "params_string": "14B",
             "loaded_instances": m.instances, "max_context_length": 32768, "format": "gguf"}
            for m in self.models.values()]})

    def load_instance(self, key: str, ratio: float | str = "max") -> str:
        m = self.models[key]
        iid = key if not m.instances else f"{key}:{len(m.instances) + 1}"
        m.instances.append({"id": iid, "config": {"context_length": 4096}})
        self.ratios[iid] = ratio
        return iid

    async def load(self, request: Request) -> JSONResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await self._body(request)
        if body.get("model") not in self.models:
            return JSONResponse({"error": {"message": f"model {body.get('model')} not found"}},
                                status_code=404)
        iid = self.load_instance(body["model"])
        return JSONResponse({"type": "llm", "instance_id": iid, "load_time_seconds": 0.1,
                             "status": "loaded"})

    async def unload(self, request: Request) -> JSONResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await self._body(request)
        if (fault := await self._faulty_unload()) is not None:
            return fault
        for m in self.models.values():
            for inst in m.instances:
                if inst["id"] == body.get("instance_id"):
                    m.instances.remove(inst)
                    self.ratios.pop(inst["id"], None)
                    return JSONResponse({"instance_id": inst["id"]})
        return JSONResponse({"error": {"message": "no such instance"}}, status_code=404)


class SdkStandIn:
    """The `lmstudio` SDK client as the control uses it: `client.llm.load_new_instance`."""

    def __init__(self, fake: FakeLMStudio) -> None:
        self.fake = fake
        self.llm = self
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def load_new_instance(self, model_key: str, instance_identifier: str | None = None, *,
                          ttl: int | None = 3600, config: dict[str, Any] | None = None
                          ) -> str:
        self.calls.append((model_key, config or {}))
        ratio = ((config or {}).get("gpu") or {}).get("ratio", "max")
        return self.fake.load_instance(model_key, ratio)


class FakeOllama(_Server):
    def __init__(self, name: str = "llama3.1:latest", size_gib: float = 8.0,
                 blocks: int = 32) -> None:
        super().__init__()
        self.name, self.size, self.blocks = name, int(size_gib * GIB), blocks
        self.loaded_layers: int | None = blocks + 1  # None: not loaded

    def routes(self) -> list[Route]:
        return [Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/ps", self.ps), Route("/api/show", self.show, methods=["POST"])]

    def error_body(self, message: str) -> dict[str, Any]:
        return {"error": message}

    def _known(self, model: str) -> bool:
        return model in (self.name, self.name.split(":")[0])

    def _not_found(self, model: str) -> JSONResponse:
        return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)

    async def generate(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        model = str(body.get("model", ""))
        if not self._known(model):
            return self._not_found(model)
        answer = {"model": model, "created_at": "2026-01-01T01:00:00Z", "response": "",
                  "done": True}
        if body.get("keep_alive") == 0 and not body.get("prompt"):
            if (fault := await self._faulty_unload()) is not None:
                return fault
            self.loaded_layers = None
            return JSONResponse({**answer, "done_reason": "unload"})
        layers = (body.get("options") or {}).get("num_gpu")
        self.loaded_layers = self.blocks + 1 if layers is None else int(layers)
        return JSONResponse(answer)

    async def ps(self, request: Request) -> JSONResponse:
        if self.loaded_layers is None:
            return JSONResponse({"models": []})
        share = min(1.0, self.loaded_layers / (self.blocks + 1))
        return JSONResponse({"models": [{
            "name": self.name, "model": self.name, "size": self.size, "digest": "2af3b81862c6",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B",
                        "quantization_level": "Q4_0"},
            "expires_at": "2026-01-01T01:05:00Z", "size_vram": int(self.size * share)}]})

    async def show(self, request: Request) -> JSONResponse:
        body = await self._body(request)
        if not self._known(str(body.get("model", ""))):
            return self._not_found(str(body.get("model", "")))
        return JSONResponse({"modelfile": "FROM llama3.1", "parameters": "", "template": "",
                             "details": {"format": "gguf", "family": "llama"},
                             "model_info": {"general.architecture": "llama",
                                            "llama.block_count": self.blocks,
                                            "llama.context_length": 131072}})
