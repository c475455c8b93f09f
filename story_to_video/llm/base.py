"""The LLM seam: what the pipeline needs from any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]
TokenCallback = Callable[[str], None]


class LLMError(RuntimeError):
    """Base for LLM failures; messages are meant for the user as they are.

    Unless a subclass says otherwise, the server (or the model on it) failed: the CLI exits
    with its "a service failed" code.
    """


class LLMUnavailable(LLMError):
    """The server cannot be reached, does not answer in time, or keeps failing."""


class LLMReplyError(LLMError):
    """The server answered, but not with a usable reply (not JSON, no choices, too large)."""


class LLMConfigError(LLMError):
    """The settings do not fit the server: wrong URL, refused API key. Bad input."""


class LLMModelNotFound(LLMConfigError):
    """The configured model is not one the server offers."""


class LLMNotReachable(LLMConfigError, LLMUnavailable):
    """Nothing answers at the URL on first contact: the server is not started, or the
    settings point at the wrong place. Bad input, unlike a server failing mid-run."""


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
        deadline_s: float | None = None,
    ) -> Completion:
        """Stream a text reply. `deadline_s` shortens the call's own deadline (stage time)."""
        ...

    def complete_json(
        self,
        messages: list[Message],
        schema: dict[str, Any],
        *,
        max_tokens: int,
        temperature: float,
        deadline_s: float | None = None,
    ) -> Completion: ...

    def models(self) -> list[str]: ...
