"""LLM backends. `open_llm` yields a ready backend for the configured server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..config import LLMSettings
from .base import (
    Completion,
    LLMBackend,
    LLMConfigError,
    LLMError,
    LLMModelNotFound,
    LLMNotReachable,
    LLMReplyError,
    LLMUnavailable,
    Message,
)
from .embedded import EmbeddedLlamaServer
from .openai_backend import OpenAICompatibleBackend

__all__ = [
    "Completion", "EmbeddedLlamaServer", "LLMBackend", "LLMConfigError", "LLMError",
    "LLMModelNotFound", "LLMNotReachable", "LLMReplyError", "LLMUnavailable", "Message",
    "OpenAICompatibleBackend", "open_llm",
]


def _backend(cfg: LLMSettings, base_url: str) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(
        base_url, backend=cfg.backend, model=cfg.model, api_key=cfg.api_key(),
        structured_mode=cfg.structured_output, timeout_s=cfg.timeout_s,
        connect_retries=cfg.connect_retries, call_deadline_s=cfg.call_deadline_s,
        stage_deadline_s=cfg.stage_deadline_s, retry_wait_max_s=cfg.retry_wait_max_s,
        max_reply_chars=cfg.max_reply_chars,
    )


@contextlib.contextmanager
def open_llm(cfg: LLMSettings, log_dir: Path | None = None) -> Iterator[OpenAICompatibleBackend]:
    """Start the embedded server if configured (and stop it after), else attach to the URL.

    The backend is checked before it is handed out: server reachable, model offered.
    """
    url = cfg.resolved_base_url()
    if url is not None:
        backend = _backend(cfg, url)
        backend.model()
        yield backend
        return
    server = EmbeddedLlamaServer(
        n_ctx=cfg.embedded_n_ctx, threads=cfg.embedded_threads,
        gpu_layers=cfg.embedded_gpu_layers, start_timeout_s=cfg.embedded_start_timeout_s,
        log_path=log_dir / "llm-server.log" if log_dir else None,
    )
    with server.running_server() as base_url:
        backend = _backend(cfg, base_url)
        backend.model()
        yield backend
