"""The one real LLM backend: any OpenAI-compatible server, through the `openai` client.

LM Studio, Ollama (/v1), llama.cpp's server and llama-cpp-python's server differ in which
structured-output form they accept; this backend tries the strongest form first and
remembers the first one the server takes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import openai
from openai import OpenAI

from .base import Completion, LLMModelNotFound, LLMUnavailable, Message, TokenCallback

log = logging.getLogger(__name__)

# Strongest first. llama-cpp-python's server answers `json_schema` with HTTP 500 but takes
# `json_object` plus a `schema` (it compiles the schema to a grammar).
MODE_ORDER: dict[str, list[str]] = {
    "llamacpp-embedded": ["json_object_schema", "json_schema", "prompt"],
    "lmstudio": ["json_schema", "json_object_schema", "prompt"],
    "ollama": ["json_schema", "prompt"],
    "openai-compatible": ["json_schema", "json_object_schema", "prompt"],
}


def _response_format(mode: str, schema: dict[str, Any]) -> dict[str, Any]:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    return {}


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
    ) -> None:
        self.base_url = base_url
        self.backend = backend
        self._model = model
        self._checked = False
        # The client retries connection errors, 408/429/5xx with exponential backoff.
        self._client = OpenAI(
            base_url=base_url, api_key=api_key or "not-needed",
            timeout=timeout_s, max_retries=connect_retries,
        )
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

    def models(self) -> list[str]:
        try:
            return [m.id for m in self._client.models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise LLMUnavailable(
                f"cannot reach the LLM server at {self.base_url}: {err}. "
                f"Is {self.backend} running and serving an OpenAI-compatible /v1 API?"
            ) from err

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
            raise LLMModelNotFound(
                f"model {self._model!r} is not offered by {self.base_url}; "
                f"available: {', '.join(available)}"
            )
        self._checked = True
        return self._model

    def _create(self, **kwargs: Any) -> Any:
        try:
            return self._client.chat.completions.create(model=self.model(), **kwargs)
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise LLMUnavailable(f"LLM server at {self.base_url} did not answer: {err}") from err
        except openai.NotFoundError as err:
            self._checked = False
            self.model()  # raises LLMModelNotFound with the list when that is the cause
            raise LLMUnavailable(f"LLM server at {self.base_url}: {err}") from err

    def complete(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        on_token: TokenCallback | None = None,
    ) -> Completion:
        start = time.monotonic()
        stream = self._create(
            messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
        )
        parts: list[str] = []
        chunks = 0
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta.content or ""
            if delta:
                chunks += 1
                parts.append(delta)
                if on_token is not None:
                    on_token(delta)
        return Completion("".join(parts), chunks, time.monotonic() - start, "text")

    def complete_json(
        self,
        messages: list[Message],
        schema: dict[str, Any],
        *,
        max_tokens: int,
        temperature: float,
    ) -> Completion:
        while True:
            mode = self._modes[0]
            start = time.monotonic()
            try:
                resp = self._create(
                    messages=messages, max_tokens=max_tokens, temperature=temperature,
                    extra_body={"response_format": _response_format(mode, schema)}
                    if mode != "prompt" else None,
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError,
                    openai.InternalServerError) as err:
                if len(self._modes) == 1:
                    raise LLMUnavailable(
                        f"LLM server at {self.base_url} rejected the request ({mode}): {err}"
                    ) from err
                log.warning("server rejected structured mode %s (%s); trying %s",
                            mode, err.status_code, self._modes[1])
                self._modes = self._modes[1:]
                continue
            text = resp.choices[0].message.content or ""
            tokens = resp.usage.completion_tokens if resp.usage else len(text) // 4
            return Completion(text, tokens, time.monotonic() - start, mode)
