"""The LLM seam: what the pipeline needs from any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]
TokenCallback = Callable[[str], None]


class LLMError(RuntimeError):
    """Base for LLM failures; messages are meant for the user as they are."""


class LLMUnavailable(LLMError):
    """The server cannot be reached or does not answer."""


class LLMModelNotFound(LLMError):
    """The configured model is not one the server offers."""


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    seconds: float
    mode: str = "text"  # which structured-output form produced it

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class LLMBackend(Protocol):
    """A chat model behind an OpenAI-compatible API."""

    @property
    def description(self) -> str: ...

    def complete(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        on_token: TokenCallback | None = None,
    ) -> Completion: ...

    def complete_json(
        self,
        messages: list[Message],
        schema: dict[str, Any],
        *,
        max_tokens: int,
        temperature: float,
    ) -> Completion: ...

    def models(self) -> list[str]: ...
