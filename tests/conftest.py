from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No user config or STV_* variable leaks into a test."""
    for key in list(os.environ):
        if key.startswith("STV_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def embedded_llm_url() -> Iterator[str]:
    """One real embedded llama.cpp server (SmolLM2) for the whole session."""
    from story_to_video.llm.embedded import EmbeddedLlamaServer

    server = EmbeddedLlamaServer()
    with server.running_server() as url:
        yield url


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (ephemeral, SQLite) for every test that runs flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
