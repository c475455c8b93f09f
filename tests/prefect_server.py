"""A real `prefect server start` on a free port for tests, with its own PREFECT_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from story_to_video.llm.embedded import free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


@contextmanager
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Yields the environment that points clients (CLI, workers, flows) at the server."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("Prefect server did not start: "
                        + (tmp_path / "server.log").read_text()[-2000:])
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
