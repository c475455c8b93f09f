"""A Starlette app served by uvicorn on a thread: the one way the test fakes (ComfyUI, the
LLM servers) run, so that each fake holds only its routes and its faults."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class Served:
    def __init__(self, app: Any, port: int, *, what: str, log_level: str = "warning",
                 timeout_s: float = 10.0, **config: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level=log_level, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)
