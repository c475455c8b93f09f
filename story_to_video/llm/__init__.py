"""LLM backends. `open_llm` yields a ready backend for the configured server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..config import ConfigError, LLMSettings
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
from .embedded import CommandLlamaServer, EmbeddedLlamaServer, LLMServer
from .openai_backend import OpenAICompatibleBackend

__all__ = [
    "CommandLlamaServer", "Completion", "EmbeddedLlamaServer", "LLMBackend", "LLMConfigError",
    "LLMError", "LLMModelNotFound", "LLMNotReachable", "LLMReplyError", "LLMServer",
    "LLMUnavailable", "Message", "OpenAICompatibleBackend", "connect_llm", "llm_server",
    "open_llm",
]


def _backend(cfg: LLMSettings, base_url: str) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(
        base_url, backend=cfg.backend, model=cfg.model, api_key=cfg.api_key(),
        structured_mode=cfg.structured_output, timeout_s=cfg.timeout_s,
        connect_retries=cfg.connect_retries, call_deadline_s=cfg.call_deadline_s,
        stage_deadline_s=cfg.stage_deadline_s, retry_wait_max_s=cfg.retry_wait_max_s,
        max_reply_chars=cfg.max_reply_chars,
    )


def llm_server(cfg: LLMSettings, log_dir: Path | None = None) -> LLMServer | None:
    """The llama.cpp server the project starts for this config (the embedded default, or
    the user's `llm.server_command`), or None when it attaches to a running server."""
    log_path = log_dir / "llm-server.log" if log_dir else None
    if cfg.server_command:
        url = cfg.resolved_base_url()
        if url is None:
            raise ConfigError("llm.base_url: required with llm.server_command (where the "
                              "server will answer, e.g. http://127.0.0.1:8080/v1)")
        return CommandLlamaServer(cfg.server_command, url, log_path=log_path,
                                  start_timeout_s=cfg.embedded_start_timeout_s)
    if cfg.resolved_base_url() is not None:
        return None
    return EmbeddedLlamaServer(
        n_ctx=cfg.embedded_n_ctx, threads=cfg.embedded_threads,
        gpu_layers=cfg.embedded_gpu_layers, start_timeout_s=cfg.embedded_start_timeout_s,
        log_path=log_path,
    )


def connect_llm(cfg: LLMSettings, base_url: str) -> OpenAICompatibleBackend:
    """A backend for a server that answers at base_url, checked: reachable, model offered."""
    backend = _backend(cfg, base_url)
    backend.model()
    return backend


@contextlib.contextmanager
def open_llm(cfg: LLMSettings, log_dir: Path | None = None) -> Iterator[OpenAICompatibleBackend]:
    """Start the project's server if configured (and stop it after), else attach to the URL.

    The backend is checked before it is handed out: server reachable, model offered.
    """
    server = llm_server(cfg, log_dir)
    if server is None:
        yield connect_llm(cfg, cfg.resolved_base_url() or "")
        return
    with server.running_server() as base_url:
        yield connect_llm(cfg, base_url)
