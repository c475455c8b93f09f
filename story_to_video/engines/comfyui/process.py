"""ComfyUI as a supervised child process, or attached to one that is already running."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from pathlib import Path
from typing import Protocol

import httpx

from .errors import ComfyUIUnavailable

log = logging.getLogger(__name__)


class RestartUnavailable(ComfyUIUnavailable):
    """Attached to a ComfyUI this project did not start: it cannot restart it."""


class ComfyUIServer(Protocol):
    url: str
    supervised: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self, reason: str) -> None: ...

    def alive(self) -> bool: ...


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/system_stats", timeout=2).status_code == 200
    return False


class AttachedComfyUI:
    supervised = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def start(self) -> None:
        if not _answers(self.url):
            raise ComfyUIUnavailable(
                f"no ComfyUI answers at {self.url}/system_stats. Start it (python main.py "
                "--listen 127.0.0.1 --port 8188) or set comfyui.command so the project "
                "starts it")

    def stop(self) -> None:
        return None

    def restart(self, reason: str) -> None:
        raise RestartUnavailable(f"cannot restart ComfyUI at {self.url} ({reason}): it was "
                                 "already running, not started by story-to-video")

    def alive(self) -> bool:
        return True  # unknown; a dropped WebSocket tells


class ComfyUIProcess:
    """Start ComfyUI from a command and folder, health-check it, log it, stop it cleanly."""

    supervised = True

    def __init__(self, command: list[str], *, url: str, cwd: str | None = None,
                 log_path: Path | None = None, start_timeout_s: float = 180.0,
                 stop_timeout_s: float = 20.0) -> None:
        self.command, self.cwd, self.url = command, cwd, url.rstrip("/")
        self.log_path = log_path
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if _answers(self.url):
            raise ComfyUIUnavailable(f"something already answers at {self.url}; refusing to "
                                     "start a second ComfyUI on the same port")
        log.info("starting ComfyUI: %s (cwd %s)", " ".join(self.command), self.cwd or ".")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(self.command, cwd=self.cwd, stdout=out,
                                              stderr=subprocess.STDOUT)
        else:
            self._proc = subprocess.Popen(self.command, cwd=self.cwd,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ComfyUIUnavailable(f"ComfyUI exited with code {self._proc.returncode} "
                                         f"while starting; see {self.log_path}")
            if _answers(self.url):
                log.info("ComfyUI answers at %s", self.url)
                return
            time.sleep(0.5)
        self.stop()
        raise ComfyUIUnavailable(f"ComfyUI did not answer within {self.start_timeout_s:.0f}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("ComfyUI ignored SIGTERM for %.0fs; killing it", self.stop_timeout_s)
            proc.kill()
            proc.wait()

    def restart(self, reason: str) -> None:
        log.warning("restarting ComfyUI: %s", reason)
        self.stop()
        self.start()
        self.restarts += 1

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (the broker's RSS readings)."""
        return self._proc.pid if self.alive() and self._proc is not None else None
