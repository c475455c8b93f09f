"""A scripted OpenAI-compatible LLM server: real HTTP on loopback (starlette + uvicorn) that
replays what a test scripts, hostile replies included.

Wire format after the OpenAI API reference (https://platform.openai.com/docs/api-reference,
"Models: list" and "Chat: create"), which LM Studio, Ollama (/v1) and llama.cpp's servers
follow: GET /v1/models answers {"object": "list", "data": [{"id": ..., "object": "model"}]};
POST /v1/chat/completions answers a `chat.completion` object, or with "stream": true
server-sent events `data: {chat.completion.chunk}`, the last chunk carrying `finish_reason`,
then `data: [DONE]`. Errors are {"error": {"message", "type", "code"}} with an HTTP status,
429 with a Retry-After header. Each request takes the next scripted reply of its route;
when none is left, the route's default answers. It lives in tests/ and never ships.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from story_to_video.llm.embedded import free_port
from tests.served import Served

MODEL = "scripted-7b"


class DropConnection(Exception):
    """Raised inside a streamed body: uvicorn closes the socket without the final chunk."""


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # a whole body (JSON or anything else)
    events: list[bytes] = field(default_factory=list)  # SSE payloads, one write each
    delay_s: float = 0.0  # pause before each event
    stall_s: float = 0.0  # pause before the response starts
    trickle: bytes | None = None  # after the events, send this every delay_s, forever
    drop: bool = False  # after the events, cut the connection mid-body
    content_type: str = "application/json"


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": MODEL, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": finish}]}


def event(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def stream(text: str, *, pieces: int = 8, finish: str | None = "stop", done: bool = True,
           **kw: Any) -> Reply:
    """A well-formed SSE reply of `text` in `pieces` chunks, unless told otherwise."""
    step = max(1, -(-len(text) // pieces))
    events = [event(chunk(text[i:i + step])) for i in range(0, len(text), step)]
    if finish is not None:
        events.append(event(chunk(None, finish)))
    if done:
        events.append(b"data: [DONE]\n\n")
    return Reply(events=events, content_type="text/event-stream", **kw)


def completion(text: str, finish: str = "stop") -> Reply:
    """A non-streamed chat.completion (a server that ignores stream=true)."""
    return Reply(body=json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode())


def error(status: int, message: str, **headers: str) -> Reply:
    body = {"error": {"message": message, "type": "server_error", "code": status}}
    return Reply(status=status, headers=headers, body=json.dumps(body).encode())


def models(*ids: str) -> Reply:
    return Reply(body=json.dumps({"object": "list", "data": [
        {"id": i, "object": "model", "created": 1, "owned_by": "me"} for i in ids]}).encode())


@dataclass
class ScriptedLLMServer:
    port: int = field(default_factory=free_port)
    chat: list[Reply] = field(default_factory=list)
    model_list: list[Reply] = field(default_factory=list)
    default_chat: Callable[[dict[str, Any]], Reply] | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.served: Served | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *chat: Reply, model_list: list[Reply] | None = None,
               default_chat: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        with self._lock:
            self.chat = list(chat)
            self.model_list = list(model_list or [])
            self.default_chat = default_chat
            self.requests.clear()

    def chat_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "chat"]

    def start(self) -> ScriptedLLMServer:
        app = Starlette(routes=[
            Route("/v1/models", self._models),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
        ])
        self.served = Served(app, self.port, what="scripted LLM server", log_level="critical",
                             timeout_s=20)
        return self

    def stop(self) -> None:
        if self.served is not None:
            self.served.stop()

    def _next(self, queue: list[Reply]) -> Reply | None:
        with self._lock:
            return queue.pop(0) if queue else None

    async def _models(self, _: Request) -> Response:
        self.requests.append(("models", {}))
        return await self._send(self._next(self.model_list) or models(MODEL))

    async def _chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.requests.append(("chat", body))
        reply = self._next(self.chat)
        if reply is None:
            reply = (self.default_chat(body) if self.default_chat
                     else error(500, "nothing scripted"))
        return await self._send(reply)

    async def _send(self, reply: Reply) -> Response:
        if reply.stall_s:
            await asyncio.sleep(reply.stall_s)
        if reply.body is not None:
            return Response(reply.body, status_code=reply.status, headers=reply.headers,
                            media_type=reply.content_type)

        async def body() -> AsyncIterator[bytes]:
            for e in reply.events:
                if reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                yield e
            while reply.trickle is not None:
                await asyncio.sleep(reply.delay_s or 0.1)
                yield reply.trickle
            if reply.drop:
                raise DropConnection("scripted drop")

        return StreamingResponse(body(), status_code=reply.status, headers=reply.headers,
                                 media_type=reply.content_type)
