from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # the same quiet Prefect defaults the console entry sets (story_to_video.cli.main)
    from story_to_video.cli import PREFECT_DEFAULTS

    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


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


@pytest.fixture(scope="session")
def real_comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real ComfyUI 0.33 (CPU, tiny random-weight Wan models) for the whole session,
    made by scripts/comfyui_test_server.py from ../shared/comfyui or $STV_COMFYUI_SRC.
    STV_TEST_COMFYUI_WORKDIR=<dir> reuses a server started there by the tool (keeps its
    cache warm between runs while developing)."""
    from tests.real_comfyui import attach_or_start

    server = attach_or_start(tmp_path_factory.mktemp("comfyui"))
    try:
        yield server
    finally:
        server.stop()
