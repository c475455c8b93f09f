"""ComfyUI's HTTP + WebSocket API, over httpx and websockets.

One client id per client; the WebSocket is opened before a prompt is queued so no event is
missed, and re-opened with the same id if it drops (ComfyUI then re-sends the node it is on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from .errors import (
    ComfyUIDied,
    ComfyUIError,
    ComfyUIUnavailable,
    ExecutionError,
    Interrupted,
    PromptValidationError,
    StallError,
)

log = logging.getLogger(__name__)
EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class Execution:
    """What happened to one prompt, as the WebSocket and /history told it."""

    prompt_id: str
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    cached_nodes: set[str] = field(default_factory=set)
    executed_nodes: set[str] = field(default_factory=set)
    progress_events: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    reconnects: int = 0
    node_seconds: dict[str, float] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)  # every node of the prompt

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def fully_cached(self) -> bool:
        """ComfyUI answered every node from its cache: nothing was computed now. Decided from
        `execution_cached`, never from timing (a real decode sends no progress and can take
        under a second)."""
        return bool(self.nodes) and self.nodes <= self.cached_nodes


class ComfyUIClient:
    def __init__(self, url: str, *, timeout_s: float = 30.0, client_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    # -- plain HTTP ------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise ComfyUIUnavailable(f"ComfyUI at {self.url} does not answer ({path}): {err}"
                                     ) from err

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        if r.status_code >= 400:
            raise ComfyUIError(f"ComfyUI {method} {path} answered HTTP {r.status_code}: "
                               f"{r.text[:500]}")
        return r.json() if r.content else None

    def system_stats(self) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", "/system_stats")
        return data

    def object_info(self) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", "/object_info")
        return data

    def queue(self) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", "/queue")
        return data

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        data = self._json("GET", f"/history/{prompt_id}")
        entry: dict[str, Any] | None = (data or {}).get(prompt_id)
        return entry

    def free(self, *, unload_models: bool = False, free_memory: bool = False) -> None:
        self._json("POST", "/free", json={"unload_models": unload_models,
                                          "free_memory": free_memory})

    def interrupt(self) -> None:
        self._json("POST", "/interrupt", json={})

    def upload_image(self, path: Path, *, subfolder: str = "story-to-video",
                     overwrite: bool = True) -> str:
        """Upload an input image; returns the name to put in a LoadImage node."""
        with open(path, "rb") as fh:
            data = self._json("POST", "/upload/image",
                              files={"image": (path.name, fh, "image/png")},
                              data={"subfolder": subfolder, "type": "input",
                                    "overwrite": "true" if overwrite else "false"})
        sub = data.get("subfolder") or ""
        return f"{sub}/{data['name']}" if sub else str(data["name"])

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> Iterator[bytes]:
        """Stream an output file's bytes from GET /view."""
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        try:
            with self.http.stream("GET", "/view", params=params) as r:
                if r.status_code != 200:
                    raise ComfyUIError(f"GET /view {filename} answered HTTP {r.status_code}")
                yield from r.iter_bytes()
        except httpx.TransportError as err:
            raise ComfyUIUnavailable(f"ComfyUI at {self.url} dropped /view {filename}: {err}"
                                     ) from err

    def submit(self, prompt: dict[str, Any]) -> str:
        r = self._request("POST", "/prompt", json={"prompt": prompt,
                                                   "client_id": self.client_id})
        if r.status_code == 400:
            body = r.json()
            raise PromptValidationError(body.get("error"), body.get("node_errors") or {})
        if r.status_code >= 400:
            raise ComfyUIError(f"POST /prompt answered HTTP {r.status_code}: {r.text[:500]}")
        body = r.json()
        if body.get("node_errors"):
            log.warning("ComfyUI queued prompt with node errors: %s", body["node_errors"])
        return str(body["prompt_id"])

    # -- WebSocket -------------------------------------------------------------------------
    def _ws_url(self) -> str:
        base = self.url.replace("https://", "wss://").replace("http://", "ws://")
        return f"{base}/ws?clientId={self.client_id}"

    def open_socket(self, attempts: int = 1, delay_s: float = 1.0) -> ClientConnection:
        last: Exception | None = None
        for i in range(attempts):
            try:
                return connect(self._ws_url(), open_timeout=10, max_size=2**26,
                               ping_interval=20, ping_timeout=20)
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as err:
                last = err
                if i + 1 < attempts:
                    time.sleep(delay_s)
        raise ComfyUIUnavailable(f"ComfyUI WebSocket at {self._ws_url()} unreachable: {last}")

    def run(
        self,
        prompt: dict[str, Any],
        *,
        on_event: EventCallback | None = None,
        stall_timeout_s: float = 600.0,
        total_timeout_s: float = 3600.0,
        alive: Callable[[], bool] | None = None,
    ) -> Execution:
        """Queue a prompt and follow it to the end; raises the typed error on failure."""
        sockets = [self.open_socket(attempts=3)]
        try:
            prompt_id = self.submit(prompt)
            execution = Execution(prompt_id, nodes=set(prompt))
            self._follow(sockets, execution, on_event, stall_timeout_s, total_timeout_s, alive)
        finally:
            for ws in sockets:
                with contextlib.suppress(Exception):
                    ws.close()
        return execution

    def _follow(
        self, sockets: list[ClientConnection], ex: Execution, on_event: EventCallback | None,
        stall_timeout_s: float, total_timeout_s: float, alive: Callable[[], bool] | None,
    ) -> None:
        last_activity = time.monotonic()
        node: str | None = None
        node_started = time.monotonic()
        deadline = ex.started + total_timeout_s
        while True:
            now = time.monotonic()
            if now - last_activity > stall_timeout_s or now > deadline:
                self._interrupt_quietly()
                raise StallError(now - last_activity, node)
            if alive is not None and not alive():
                raise ComfyUIDied(f"ComfyUI process exited while running prompt {ex.prompt_id}")
            try:
                raw = sockets[-1].recv(timeout=min(1.0, stall_timeout_s))
            except TimeoutError:
                continue
            except ConnectionClosed:
                sockets.append(self._reconnect(ex))
                if self._finished_in_history(ex):
                    return
                continue
            if isinstance(raw, bytes):
                continue  # binary preview frames: ignored by design
            msg = json.loads(raw)
            kind, data = msg.get("type", ""), msg.get("data") or {}
            if data.get("prompt_id") not in (None, ex.prompt_id):
                continue  # another client's prompt
            if kind == "status" or data.get("prompt_id") is None:
                continue
            last_activity = time.monotonic()
            if on_event is not None:
                on_event(kind, data)
            if kind == "execution_cached":
                ex.cached_nodes.update(str(n) for n in data.get("nodes", []))
            elif kind == "executing":
                if node is not None:
                    ex.node_seconds[node] = time.monotonic() - node_started
                node, node_started = data.get("node"), time.monotonic()
                if node is None:  # older servers end a prompt this way
                    break
            elif kind == "progress":
                ex.progress_events += 1
            elif kind == "executed":
                ex.executed_nodes.add(str(data.get("node")))
                ex.outputs[str(data.get("node"))] = data.get("output")
            elif kind == "execution_success":
                if node is not None:
                    ex.node_seconds[node] = time.monotonic() - node_started
                break
            elif kind == "execution_error":
                raise ExecutionError.from_message(data)
            elif kind == "execution_interrupted":
                raise Interrupted(f"prompt {ex.prompt_id} was interrupted in node "
                                  f"{data.get('node_id')} ({data.get('node_type')})")
        ex.finished = time.monotonic()
        self._finished_in_history(ex)

    def _reconnect(self, ex: Execution) -> ClientConnection:
        """The socket dropped: ComfyUI restarted its socket or died. Find out which, fast."""
        ex.reconnects += 1
        log.warning("ComfyUI WebSocket dropped during %s; reconnecting", ex.prompt_id)
        try:
            return self.open_socket(attempts=3, delay_s=1.0)
        except ComfyUIUnavailable as err:
            raise ComfyUIDied(f"ComfyUI went away while running prompt {ex.prompt_id}: {err}"
                              ) from err

    def _finished_in_history(self, ex: Execution) -> bool:
        """Fill outputs from /history; True when the prompt has finished there."""
        entry = self.history(ex.prompt_id)
        if not entry:
            return False
        status = entry.get("status") or {}
        for kind, data in status.get("messages", []):
            if kind == "execution_cached":
                ex.cached_nodes.update(str(n) for n in data.get("nodes", []))
            elif kind == "execution_error":
                raise ExecutionError.from_message(data)
            elif kind == "execution_interrupted":
                raise Interrupted(f"prompt {ex.prompt_id} was interrupted")
        ex.outputs.update(entry.get("outputs") or {})
        done = bool(status.get("completed")) or status.get("status_str") == "success"
        if done and not ex.finished:
            ex.finished = time.monotonic()
        return done

    def _interrupt_quietly(self) -> None:
        with contextlib.suppress(ComfyUIError):
            self.interrupt()
