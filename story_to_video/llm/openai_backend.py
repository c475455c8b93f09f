"""The one real LLM backend: any OpenAI-compatible server, through the `openai` client.

LM Studio, Ollama (/v1), llama.cpp's server and llama-cpp-python's server differ in which
structured-output form they accept; this backend tries the strongest form first and moves
on only when the server rejects the form itself, remembering the move.

Every reply is streamed and read by this module, not by the client's parser, because a
hostile or broken server must end in one clear error, never a traceback or a hang:
- each call has a deadline (retries included) that a stalled or trickling server cannot
  stretch: the body is read on a helper thread and the caller stops waiting at the deadline;
- what is retried is chosen here, with a bound: connection refused, 408/409/429/5xx (429 and
  503 after their Retry-After, capped), a stream dropped mid-way or cut off without a finish
  reason or [DONE]. A stall (no byte for `timeout_s`) is not retried;
- a reply is capped in size (from max_tokens and `max_reply_chars`); bytes that are not
  UTF-8 are replaced, control characters and lone surrogates removed (textsafe.clean);
- a server that ignores stream=true and answers one JSON body is read the same way.
"""

from __future__ import annotations

import email.utils
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
from openai import OpenAI

from ..textsafe import clean, one_line
from .base import (
    Completion,
    LLMConfigError,
    LLMError,
    LLMModelNotFound,
    LLMNotReachable,
    LLMReplyError,
    LLMUnavailable,
    Message,
    TokenCallback,
)

log = logging.getLogger(__name__)

# Strongest first. llama-cpp-python's server answers `json_schema` with HTTP 500 but takes
# `json_object` plus a `schema` (it compiles the schema to a grammar).
MODE_ORDER: dict[str, list[str]] = {
    "llamacpp-embedded": ["json_object_schema", "json_schema", "prompt"],
    "lmstudio": ["json_schema", "json_object_schema", "prompt"],
    "ollama": ["json_schema", "prompt"],
    "openai-compatible": ["json_schema", "json_object_schema", "prompt"],
}
# A rejection that names one of these is about the response_format, not the server's health.
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# A token is a few characters; 32 leaves room for long whitespace runs in JSON.
CHARS_PER_TOKEN_MAX = 32
_MAX_LINE_BYTES = 4 * 2**20
_MAX_MODELS = 1000


def _response_format(mode: str, schema: dict[str, Any]) -> dict[str, Any]:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    return {}


class _Retryable(Exception):
    """One try failed in a way another try may fix."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Unreachable(_Retryable):
    """The connection itself failed (refused, no route, DNS)."""


class _FormatRejected(LLMError):
    """The server refused the structured-output form itself."""


class _TooLarge(LLMReplyError):
    """The reply passed its size cap."""


@dataclass
class _Reply:
    text: str
    chunks: int
    finish: str | None


def _retry_after(headers: Any) -> float | None:
    """Seconds from Retry-After (seconds or HTTP date) or retry-after-ms; None if absent."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _error_text(value: Any) -> str:
    """The message of an OpenAI-style error object, whatever its shape."""
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)
        return str(inner)
    return str(value)


class _StreamReader:
    """Server-sent events of a chat completion stream, fed raw bytes as they arrive."""

    def __init__(self, limit: int, on_piece: Callable[[str], None]) -> None:
        self.limit, self.on_piece = limit, on_piece
        self.buf = bytearray()
        self.data: list[str] = []
        self.parts: list[str] = []
        self.size = 0
        self.chunks = 0
        self.finish: str | None = None
        self.done = False

    def feed(self, raw: bytes) -> None:
        self.buf += raw
        while (i := self.buf.find(b"\n")) >= 0:
            line = bytes(self.buf[:i]).rstrip(b"\r")
            del self.buf[: i + 1]
            self._line(line.decode("utf-8", "replace"))
        if len(self.buf) > _MAX_LINE_BYTES:
            raise LLMReplyError(f"the stream sent a line of more than {_MAX_LINE_BYTES:,} "
                                "bytes: not a chat completion stream")

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                self.data.append(value[1:] if value.startswith(" ") else value)

    def _dispatch(self) -> None:
        data, self.data = "\n".join(self.data), []
        if not data or self.done:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = _loads(data)
        except ValueError as err:
            raise _Retryable(f"the stream carried an event that is not JSON ({err})") from None
        if not isinstance(event, dict):
            raise LLMReplyError("the stream carried an event that is not a JSON object")
        if event.get("error"):
            raise _Retryable(f"the server reported an error mid-stream: "
                             f"{_error_text(event)}")
        self._choice(event.get("choices"), "delta")

    def _choice(self, choices: Any, key: str) -> None:
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return  # e.g. a usage-only chunk
        part = choices[0].get(key)
        content = part.get("content") if isinstance(part, dict) else None
        if isinstance(content, str) and content:
            self.size += len(content)
            if self.size > self.limit:
                raise _TooLarge(f"the reply passed {self.limit:,} characters")
            piece = clean(content)
            self.chunks += 1
            self.parts.append(piece)
            self.on_piece(piece)
        reason = choices[0].get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish = reason

    def end(self) -> _Reply:
        if self.buf:
            self._line(self.buf.decode("utf-8", "replace").rstrip("\r"))
            self.buf.clear()
        self._dispatch()
        if not self.done and self.finish is None:
            raise _Retryable("the stream ended without a finish reason or [DONE]: the reply "
                             f"was cut off after {self.size:,} characters")
        return _Reply("".join(self.parts), self.chunks, self.finish)


class _BodyReader:
    """A whole JSON body (a server that ignores stream=true, or GET /models), capped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()

    def feed(self, raw: bytes) -> None:
        self.buf += raw
        if len(self.buf) > self.max_bytes:
            raise _TooLarge(f"the reply passed {self.max_bytes:,} bytes")

    def json(self) -> Any:
        text = self.buf.decode("utf-8", "replace")
        try:
            return _loads(text)
        except ValueError as err:
            shown = one_line(text, 60) or "an empty body"
            raise LLMReplyError(f"the server answered with something that is not JSON "
                                f"({one_line(str(err), 60)}): {shown!r}") from None


_Reader = _StreamReader | _BodyReader


class OpenAICompatibleBackend:
    def __init__(
        self,
        base_url: str,
        *,
        backend: str = "openai-compatible",
        model: str | None = None,
        api_key: str = "not-needed",
        structured_mode: str = "auto",
        timeout_s: float = 300.0,
        connect_retries: int = 3,
        call_deadline_s: float = 600.0,
        stage_deadline_s: float = 1800.0,
        retry_wait_max_s: float = 30.0,
        max_reply_chars: int = 200_000,
    ) -> None:
        self.base_url = base_url
        self.backend = backend
        self._model = model
        self._checked = False
        self.timeout_s = timeout_s
        self.retries = connect_retries
        self.call_deadline_s = call_deadline_s
        self.stage_deadline_s = stage_deadline_s  # read by the Planner for each stage
        self.retry_wait_max_s = retry_wait_max_s
        self.max_reply_chars = max_reply_chars
        self._secret = api_key if api_key and api_key != "not-needed" else None
        self._deadline_name = f"llm.call_deadline_s = {call_deadline_s:g}s"
        # Retries are decided here (bounded, with the deadline in view), not by the client.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "not-needed",
                              timeout=timeout_s, max_retries=0)
        self._modes = (
            MODE_ORDER.get(backend, MODE_ORDER["openai-compatible"])
            if structured_mode == "auto" else [structured_mode]
        )

    @property
    def description(self) -> str:
        return f"{self.backend} at {self.base_url} (model {self._model or '?'})"

    @property
    def structured_mode(self) -> str:
        return self._modes[0]

    def _say(self, text: str) -> str:
        """Server-supplied text made fit for a message: one short line, no API key in it."""
        text = one_line(text)
        return text.replace(self._secret, "***") if self._secret else text

    # -- models ----------------------------------------------------------------------------
    def models(self) -> list[str]:
        def opener(timeout: float) -> Any:
            return self._client.models.with_streaming_response.list(timeout=timeout)

        reader = _BodyReader(4 * 2**20)
        self._with_retries("GET /models", lambda d: self._read(opener, d, lambda _: reader),
                           time.monotonic() + self.call_deadline_s, first_contact=True)
        data = reader.json()
        items = data.get("data") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise LLMReplyError(f"GET {self.base_url}/models did not answer a model list: is "
                                "this an OpenAI-compatible /v1 base URL?")
        ids = [clean(str(m["id"]))[:200] for m in items[:_MAX_MODELS]
               if isinstance(m, dict) and isinstance(m.get("id"), (str, int))]
        return [i for i in ids if i]

    def model(self) -> str:
        """The configured model, checked once against what the server offers."""
        if self._checked and self._model is not None:
            return self._model
        available = self.models()
        if self._model is None:
            if not available:
                raise LLMModelNotFound(f"the server at {self.base_url} offers no models")
            self._model = available[0]
        elif available and self._model not in available:
            shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
            raise LLMModelNotFound(
                f"model {self._model!r} is not offered by {self.base_url}; available: {shown}"
            )
        self._checked = True
        return self._model

    # -- chat ------------------------------------------------------------------------------
    def complete(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        on_token: TokenCallback | None = None,
        deadline_s: float | None = None,
    ) -> Completion:
        start = time.monotonic()
        reply = self._chat(messages, max_tokens, temperature, None, on_token, deadline_s)
        if reply.finish == "length":
            log.info("reply stopped at max_tokens (%d)", max_tokens)
        return Completion(reply.text, reply.chunks, time.monotonic() - start, "text")

    def complete_json(
        self,
        messages: list[Message],
        schema: dict[str, Any],
        *,
        max_tokens: int,
        temperature: float,
        deadline_s: float | None = None,
    ) -> Completion:
        start = time.monotonic()
        rejected: list[str] = []
        while True:
            mode = self._modes[0]
            fmt = _response_format(mode, schema) if mode != "prompt" else None
            try:
                reply = self._chat(messages, max_tokens, temperature, fmt, None, deadline_s)
            except _FormatRejected as err:
                rejected.append(f"{mode}: {err}")
                if len(self._modes) == 1:
                    raise LLMUnavailable(
                        f"LLM server at {self.base_url} rejected every structured-output form"
                        f" tried ({'; '.join(rejected)})") from None
                log.warning("server rejected structured mode %s (%s); using %s from now on",
                            mode, err, self._modes[1])
                self._modes = self._modes[1:]
                continue
            return Completion(reply.text, reply.chunks, time.monotonic() - start, mode)

    def _chat(self, messages: list[Message], max_tokens: int, temperature: float,
              fmt: dict[str, Any] | None, on_token: TokenCallback | None,
              deadline_s: float | None) -> _Reply:
        by_stage = deadline_s is not None and deadline_s < self.call_deadline_s
        seconds = deadline_s if deadline_s is not None and by_stage else self.call_deadline_s
        deadline = time.monotonic() + max(0.0, seconds)
        self._deadline_name = ("llm.stage_deadline_s: the stage's time ran out" if by_stage
                               else f"llm.call_deadline_s = {self.call_deadline_s:g}s")
        model = self.model()
        limit = min(self.max_reply_chars, CHARS_PER_TOKEN_MAX * max_tokens + 256)
        extra = {"response_format": fmt} if fmt else None

        def opener(timeout: float) -> Any:
            return self._client.chat.completions.with_streaming_response.create(
                model=model, messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens, temperature=temperature, stream=True,
                extra_body=extra, timeout=timeout)

        def attempt(dl: float) -> _Reply:
            sse = _StreamReader(limit, on_token or (lambda _: None))
            body = _BodyReader(8 * limit + 65536)
            got = self._read(opener, dl, lambda ctype: sse if "event-stream" in ctype else body)
            return sse.end() if got is sse else self._whole(body.json(), limit)

        try:
            reply: _Reply = self._with_retries("chat", attempt, deadline, fmt is not None)
            return reply
        except LLMReplyError as err:
            if isinstance(err, _TooLarge):
                raise LLMReplyError(
                    f"LLM server at {self.base_url}: {err} for a reply of at most "
                    f"{max_tokens} tokens; it ignores max_tokens (the cap is "
                    f"llm.max_reply_chars)") from None
            raise LLMReplyError(f"LLM server at {self.base_url}: {err}") from None

    def _whole(self, data: Any, limit: int) -> _Reply:
        """A non-streamed chat.completion body."""
        if not isinstance(data, dict):
            raise LLMReplyError("the reply is JSON but not a chat completion object")
        if data.get("error"):
            raise _Retryable(f"the server reported an error: {_error_text(data)}")
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise LLMReplyError("the reply has no choices: not a chat completion")
        reader = _StreamReader(limit, lambda _: None)
        reader._choice(data["choices"], "message")
        usage = data.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        chunks = tokens if isinstance(tokens, int) and tokens >= 0 else reader.chunks
        return _Reply("".join(reader.parts), chunks, reader.finish or "stop")

    # -- transport -------------------------------------------------------------------------
    def _with_retries(self, what: str, attempt: Callable[[float], Any], deadline: float,
                      structured: bool = False, first_contact: bool = False) -> Any:
        tries = 0
        while True:
            tries += 1
            try:
                return attempt(deadline)
            except openai.APIStatusError as err:
                retry = self._status_error(err, structured)
            except _Retryable as err:
                retry = err
            wait = retry.retry_after
            if tries > self.retries:
                why = f" (gave up after {tries} tries)"
            elif wait is not None and wait > self.retry_wait_max_s:
                why = (f"; it asks to retry after {wait:.0f}s, longer than "
                       f"llm.retry_wait_max_s ({self.retry_wait_max_s:.0f}s)")
            elif time.monotonic() + (wait := wait if wait is not None else
                                     min(8.0, 0.5 * 2 ** (tries - 1))) >= deadline:
                why = (f" (after {tries} tr{'y' if tries == 1 else 'ies'}; no time left before "
                       f"the deadline, {self._deadline_name})")
            else:
                log.warning("LLM %s: %s; retry %d/%d in %.1fs", what,
                            self._say(str(retry)), tries, self.retries, wait)
                time.sleep(wait)
                continue
            raise self._give_up(retry, why, first_contact) from None

    def _give_up(self, retry: _Retryable, why: str, first_contact: bool) -> LLMError:
        if isinstance(retry, _Unreachable):
            text = (f"cannot reach the LLM server at {self.base_url}{why}: is {self.backend} "
                    "running and serving an OpenAI-compatible /v1 API there?")
            return LLMNotReachable(text) if first_contact else LLMUnavailable(text)
        return LLMUnavailable(f"LLM server at {self.base_url}: {self._say(str(retry))}{why}")

    def _status_error(self, err: openai.APIStatusError, structured: bool) -> _Retryable:
        code = err.status_code
        said = self._say(_error_text(err.body) if err.body is not None else err.message)
        if structured and code in (400, 422, 500) and any(
                w in said.lower() for w in _FORMAT_WORDS):
            raise _FormatRejected(f"HTTP {code}: {said}")
        if code in (401, 403):
            raise LLMConfigError(
                f"LLM server at {self.base_url} refused the request (HTTP {code}): check the "
                "API key in the environment variable named by llm.api_key_env") from None
        if code == 404:
            if self._model is not None and self._checked:
                self._checked = False
                self.model()  # raises LLMModelNotFound with the list when that is the cause
            raise LLMConfigError(
                f"LLM server at {self.base_url} answered HTTP 404 ({said}): is this its "
                "OpenAI-compatible base URL (usually ending in /v1)?") from None
        if code in RETRY_STATUS:
            return _Retryable(f"HTTP {code}: {said}", _retry_after(err.response.headers))
        raise LLMUnavailable(
            f"LLM server at {self.base_url} refused the request (HTTP {code}): {said}") from None

    def _read(self, opener: Callable[[float], Any], deadline: float,
              choose: Callable[[str], _Reader]) -> _Reader:
        """Read one response by the deadline into the reader `choose` picks for its
        content type; returns that reader."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
        stop = threading.Event()
        read_timeout = max(0.05, min(self.timeout_s, deadline - time.monotonic()))
        threading.Thread(target=_pump, args=(opener, read_timeout, events, stop),
                         daemon=True, name="llm-reader").start()
        reader: _Reader | None = None
        try:
            while True:
                try:
                    tag, item = events.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise LLMUnavailable(self._deadline_message()) from None
                if tag == "open":
                    reader = choose(str(item).lower())
                elif tag == "data" and reader is not None:
                    reader.feed(item)
                elif tag == "end" and reader is not None:
                    return reader
                else:
                    raise self._transport_error(item)
        finally:
            stop.set()  # the helper thread closes the response and ends

    def _deadline_message(self) -> str:
        return (f"LLM server at {self.base_url} did not finish the reply by the deadline "
                f"({self._deadline_name}): it stalled or trickles")

    def _transport_error(self, err: BaseException) -> BaseException:
        if isinstance(err, (openai.APIStatusError, _Retryable, LLMError)):
            return err
        if isinstance(err, openai.APITimeoutError) or _is_timeout(err):
            return LLMUnavailable(
                f"LLM server at {self.base_url} sent nothing for {self.timeout_s:.0f}s "
                "(llm.timeout_s): it stalled")
        if isinstance(err, openai.APIConnectionError):
            return _Unreachable("connection failed")
        if isinstance(err, _BodyBroken):
            return _Retryable(f"the connection dropped mid-reply "
                              f"({type(err.__cause__).__name__})")
        return LLMUnavailable(f"LLM server at {self.base_url}: "
                              f"{type(err).__name__}: {self._say(str(err))}")


class _BodyBroken(Exception):
    """The transport failed while the body was being read (dropped connection)."""


def _is_timeout(err: BaseException) -> bool:
    cause = err.__cause__ if isinstance(err, _BodyBroken) else err
    return any("Timeout" in c.__name__ for c in type(cause).__mro__)


def _pump(opener: Callable[[float], Any], read_timeout: float,
          events: queue.Queue[tuple[str, Any]], stop: threading.Event) -> None:
    """Helper thread: open the response and hand its bytes over until told to stop."""
    def put(tag: str, item: Any) -> bool:
        while not stop.is_set():
            try:
                events.put((tag, item), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        with opener(read_timeout) as resp:
            if not put("open", resp.headers.get("content-type", "")):
                return
            for raw in _body(resp):
                if not raw:
                    continue
                if not put("data", raw):
                    return
        put("end", None)
    except BaseException as err:  # handed to the caller, who decides what it means
        put("error", err)


def _body(resp: Any) -> Iterator[bytes]:
    """The response's bytes; a transport failure while reading becomes _BodyBroken (the
    client library's exception types differ between its versions)."""
    it = iter(resp.iter_bytes())
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except Exception as err:
            raise _BodyBroken() from err
        yield raw
