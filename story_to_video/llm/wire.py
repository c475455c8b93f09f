"""Reading an OpenAI-compatible server's reply ourselves, whatever it sends.

A chat reply comes as server-sent events (`data: {chunk}` lines, a last chunk with
`finish_reason`, `data: [DONE]`) or, from a server that ignores stream=true, as one JSON body.
Both are read here with a size cap, invalid UTF-8 replaced and every text piece cleaned
(textsafe.clean); the bytes are fetched on a helper thread so that the caller stops waiting at
its deadline even when the server stalls mid-read or trickles forever.
"""

from __future__ import annotations

import email.utils
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..textsafe import clean, one_line
from .base import LLMReplyError

_MAX_LINE_BYTES = 4 * 2**20


class Retryable(Exception):
    """One try failed in a way another try may fix."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(LLMReplyError):
    """The reply passed its size cap."""


class DeadlinePassed(Exception):
    """The reply was not complete when the caller's deadline came."""


class BodyBroken(Exception):
    """The transport failed while the body was being read (a dropped connection); the
    client library's own exception is the cause (its types differ between versions)."""


@dataclass(frozen=True)
class Deadline:
    end: float  # time.monotonic()
    name: str  # the setting behind it, for messages

    @staticmethod
    def after(seconds: float, name: str) -> Deadline:
        return Deadline(time.monotonic() + max(0.0, seconds), name)

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Reply:
    text: str
    chunks: int
    finish: str | None


def retry_after(headers: Any) -> float | None:
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


def loads(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def error_text(value: Any) -> str:
    """The message of an OpenAI-style error object, whatever its shape."""
    if isinstance(value, dict):
        inner = value.get("error", value)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)
        return str(inner)
    return str(value)


class StreamReader:
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
            event = loads(data)
        except ValueError as err:
            raise Retryable(f"the stream carried an event that is not JSON ({err})") from None
        if not isinstance(event, dict):
            raise LLMReplyError("the stream carried an event that is not a JSON object")
        if event.get("error"):
            raise Retryable(f"the server reported an error mid-stream: {error_text(event)}")
        self.take(event.get("choices"), "delta")

    def take(self, choices: Any, key: str) -> None:
        """The text and finish reason of choices[0][key] ("delta" in a chunk, "message" in a
        whole completion); anything else is ignored (e.g. a usage-only chunk)."""
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        part = choices[0].get(key)
        content = part.get("content") if isinstance(part, dict) else None
        if isinstance(content, str) and content:
            self.size += len(content)
            if self.size > self.limit:
                raise TooLarge(f"the reply passed {self.limit:,} characters")
            piece = clean(content)
            self.chunks += 1
            self.parts.append(piece)
            self.on_piece(piece)
        reason = choices[0].get("finish_reason")
        if isinstance(reason, str) and reason:
            self.finish = reason

    def end(self) -> Reply:
        if self.buf:
            self._line(self.buf.decode("utf-8", "replace").rstrip("\r"))
            self.buf.clear()
        self._dispatch()
        if not self.done and self.finish is None:
            raise Retryable("the stream ended without a finish reason or [DONE]: the reply "
                            f"was cut off after {self.size:,} characters")
        return Reply("".join(self.parts), self.chunks, self.finish)


class BodyReader:
    """A whole JSON body (a server that ignores stream=true, or GET /models), capped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()

    def feed(self, raw: bytes) -> None:
        self.buf += raw
        if len(self.buf) > self.max_bytes:
            raise TooLarge(f"the reply passed {self.max_bytes:,} bytes")

    def json(self) -> Any:
        text = self.buf.decode("utf-8", "replace")
        try:
            return loads(text)
        except ValueError as err:
            shown = one_line(text, 60) or "an empty body"
            raise LLMReplyError(f"the server answered with something that is not JSON "
                                f"({one_line(str(err), 60)}): {shown!r}") from None

    def completion(self, limit: int) -> Reply:
        """The reply in a non-streamed chat.completion body."""
        data = self.json()
        if not isinstance(data, dict):
            raise LLMReplyError("the reply is JSON but not a chat completion object")
        if data.get("error"):
            raise Retryable(f"the server reported an error: {error_text(data)}")
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise LLMReplyError("the reply has no choices: not a chat completion")
        reader = StreamReader(limit, lambda _: None)
        reader.take(data["choices"], "message")
        usage = data.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        chunks = tokens if isinstance(tokens, int) and tokens >= 0 else reader.chunks
        return Reply("".join(reader.parts), chunks, reader.finish or "stop")


Reader = StreamReader | BodyReader


def read(opener: Callable[[float], Any], read_timeout: float, deadline: Deadline,
         choose: Callable[[str], Reader]) -> Reader:
    """Open a response (`opener(read_timeout)`, a context manager) and feed its bytes, by the
    deadline, to the reader `choose` picks for its content type; returns that reader. Raises
    DeadlinePassed, or what opening or reading raised (BodyBroken for a dropped body)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
    stop = threading.Event()
    threading.Thread(target=_pump, args=(opener, read_timeout, events, stop), daemon=True,
                     name="llm-reader").start()
    reader: Reader | None = None
    try:
        while True:
            try:
                tag, item = events.get(timeout=max(0.0, deadline.left()))
            except queue.Empty:
                raise DeadlinePassed() from None
            if tag == "open":
                reader = choose(str(item).lower())
            elif tag == "data" and reader is not None:
                reader.feed(item)
            elif tag == "end" and reader is not None:
                return reader
            else:
                raise item
    finally:
        stop.set()  # the helper thread closes the response and ends


def is_timeout(err: BaseException) -> bool:
    cause = err.__cause__ if isinstance(err, BodyBroken) else err
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
                if raw and not put("data", raw):
                    return
        put("end", None)
    except Exception as err:  # handed to the caller, who decides what it means
        put("error", err)


def _body(resp: Any) -> Iterator[bytes]:
    it = iter(resp.iter_bytes())
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except Exception as err:
            raise BodyBroken() from err
        yield raw
