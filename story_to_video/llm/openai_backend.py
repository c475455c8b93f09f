"""The one real LLM backend: any OpenAI-compatible server, through the `openai` client.

LM Studio, Ollama (/v1), llama.cpp's server and llama-cpp-python's server differ in which
structured-output form they accept; this backend tries the strongest form first and moves
on only when the server rejects the form itself, remembering the move.

A hostile or broken server ends in one clear error, never a traceback or a hang:
- every reply is streamed and read by `wire` (not by the client's parser): size-capped (from
  max_tokens and `max_reply_chars`), text cleaned, a cut-off stream detected;
- each call has a deadline, retries included, that a stalled or trickling server cannot
  stretch (`call_deadline_s`, shortened to what is left of the planner's stage);
- what is retried is decided here, with a bound (`connect_retries`): a refused connection,
  408/409/429/5xx (after Retry-After, up to `retry_wait_max_s`), a stream dropped or cut off,
  an error event. A stall (nothing for `timeout_s`) and a refused request are not retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import openai
from openai import OpenAI

from ..textsafe import clean, one_line
from . import wire
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
from .wire import Deadline, Retryable

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
_MAX_MODELS = 1000


def _response_format(mode: str, schema: dict[str, Any]) -> dict[str, Any]:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    return {}


class _Unreachable(Retryable):
    """The connection itself failed (refused, no route, DNS)."""


class _FormatRejected(LLMError):
    """The server refused the structured-output form itself."""


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
        backoff_s: float = 0.5,
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
        self.backoff_s = backoff_s  # first wait between tries without Retry-After; doubles
        self._secret = api_key if api_key and api_key != "not-needed" else None
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

        reader = wire.BodyReader(4 * 2**20)
        deadline = Deadline.after(self.call_deadline_s,
                                  f"llm.call_deadline_s = {self.call_deadline_s:g}s")
        try:
            self._with_retries("GET /models", lambda: self._read(opener, deadline,
                                                                 lambda _: reader),
                               deadline, first_contact=True)
            data = reader.json()
        except LLMReplyError as err:
            raise LLMReplyError(f"GET {self.base_url}/models: {err}") from None
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
              deadline_s: float | None) -> wire.Reply:
        if deadline_s is not None and deadline_s < self.call_deadline_s:
            deadline = Deadline.after(deadline_s, "llm.stage_deadline_s: the stage's time ran "
                                                  "out")
        else:
            deadline = Deadline.after(self.call_deadline_s,
                                      f"llm.call_deadline_s = {self.call_deadline_s:g}s")
        model = self.model()
        limit = min(self.max_reply_chars, CHARS_PER_TOKEN_MAX * max_tokens + 256)
        extra = {"response_format": fmt} if fmt else None

        def opener(timeout: float) -> Any:
            return self._client.chat.completions.with_streaming_response.create(
                model=model, messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens, temperature=temperature, stream=True,
                extra_body=extra, timeout=timeout)

        def attempt() -> wire.Reply:
            sse = wire.StreamReader(limit, on_token or (lambda _: None))
            body = wire.BodyReader(8 * limit + 65536)
            got = self._read(opener, deadline,
                             lambda ctype: sse if "event-stream" in ctype else body)
            return sse.end() if got is sse else body.completion(limit)

        try:
            reply: wire.Reply = self._with_retries("chat", attempt, deadline, fmt is not None)
            return reply
        except wire.TooLarge as err:
            raise LLMReplyError(
                f"LLM server at {self.base_url}: {err} for a reply of at most {max_tokens} "
                "tokens; it ignores max_tokens (the cap is llm.max_reply_chars)") from None
        except LLMReplyError as err:
            raise LLMReplyError(f"LLM server at {self.base_url}: {err}") from None

    # -- transport -------------------------------------------------------------------------
    def _with_retries(self, what: str, attempt: Callable[[], Any], deadline: Deadline,
                      structured: bool = False, first_contact: bool = False) -> Any:
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except openai.APIStatusError as err:
                retry = self._status_error(err, structured)
            except Retryable as err:
                retry = err
            wait = retry.retry_after
            if wait is None:
                wait = min(8.0, self.backoff_s * 2 ** (tries - 1))
            why = self._no_retry(tries, retry.retry_after, wait, deadline)
            if why:
                raise self._give_up(retry, why, first_contact) from None
            log.warning("LLM %s: %s; retry %d/%d in %.1fs", what, self._say(str(retry)),
                        tries, self.retries, wait)
            time.sleep(wait)

    def _no_retry(self, tries: int, asked: float | None, wait: float,
                  deadline: Deadline) -> str:
        """Why a failed try is not followed by another ("" when it is)."""
        if tries > self.retries:
            return f" (gave up after {tries} tries)"
        if asked is not None and asked > self.retry_wait_max_s:
            return (f"; it asks to retry after {asked:.0f}s, longer than llm.retry_wait_max_s "
                    f"({self.retry_wait_max_s:.0f}s)")
        if wait >= deadline.left():
            return (f" (after {tries} tr{'y' if tries == 1 else 'ies'}; no time left before "
                    f"the deadline, {deadline.name})")
        return ""

    def _give_up(self, retry: Retryable, why: str, first_contact: bool) -> LLMError:
        if isinstance(retry, _Unreachable):
            text = (f"cannot reach the LLM server at {self.base_url}{why}: is {self.backend} "
                    "running and serving an OpenAI-compatible /v1 API there?")
            return LLMNotReachable(text) if first_contact else LLMUnavailable(text)
        return LLMUnavailable(f"LLM server at {self.base_url}: {self._say(str(retry))}{why}")

    def _status_error(self, err: openai.APIStatusError, structured: bool) -> Retryable:
        """A retryable failure for statuses worth another try; raises for the others."""
        code = err.status_code
        said = self._say(wire.error_text(err.body) if err.body is not None else err.message)
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
            return Retryable(f"HTTP {code}: {said}", wire.retry_after(err.response.headers))
        raise LLMUnavailable(
            f"LLM server at {self.base_url} refused the request (HTTP {code}): {said}") from None

    def _read(self, opener: Callable[[float], Any], deadline: Deadline,
              choose: Callable[[str], wire.Reader]) -> wire.Reader:
        read_timeout = max(0.05, min(self.timeout_s, deadline.left()))
        try:
            return wire.read(opener, read_timeout, deadline, choose)
        except wire.DeadlinePassed:
            raise LLMUnavailable(
                f"LLM server at {self.base_url} did not finish the reply by the deadline "
                f"({deadline.name}): it stalled or trickles") from None
        except (openai.APIStatusError, Retryable, LLMError):
            raise
        except openai.APIConnectionError as err:
            if isinstance(err, openai.APITimeoutError):
                raise self._stalled() from None
            raise _Unreachable("connection failed") from None
        except wire.BodyBroken as err:
            if wire.is_timeout(err):
                raise self._stalled() from None
            raise Retryable(f"the connection dropped mid-reply "
                            f"({type(err.__cause__).__name__})") from None
        except Exception as err:
            raise LLMUnavailable(f"LLM server at {self.base_url}: {type(err).__name__}: "
                                 f"{self._say(str(err))}") from None

    def _stalled(self) -> LLMUnavailable:
        return LLMUnavailable(f"LLM server at {self.base_url} sent nothing for "
                              f"{self.timeout_s:g}s (llm.timeout_s): it stalled")
