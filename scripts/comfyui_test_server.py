"""A real ComfyUI for tests and benchmarks, from any ComfyUI checkout.

    scripts/comfyui-test-server setup  [--comfyui DIR]        # venv + random-weight models
    scripts/comfyui-test-server start  [--comfyui DIR] [--port N] [-- EXTRA COMFYUI ARGS]
                                       (e.g. -- --cache-classic)
    scripts/comfyui-test-server models --comfyui DIR --out DIR --profile full   # GPU sizes

DIR is the user's own `git clone` of ComfyUI or, in CI, `../shared/comfyui` (the default; also
$STV_COMFYUI_SRC). The checkout is only read: everything ComfyUI writes (input, output, temp,
user, its database) goes to a folder of our own, and the models come from the cache.

Cached under $STV_COMFYUI_CACHE (default ~/.cache/story-to-video/comfyui):
  venv-<key>/   ComfyUI's requirements with torch 2.11.0, torchvision 0.26.0 and torchaudio
                2.11.0 from the registry: one consistent set that imports on a CPU-only machine
                (0.33 imports torchaudio at start; the registry's torchaudio stops at 2.11.0 and
                its torchvision wheels do not import with the local CPU torch 2.13.0), and the
                same versions the GPU machine has. <key> hashes requirements.txt and the pins.
  models-tiny/  random weights with the names the shipped workflows use (comfyui_models.py).

Standard library only: the test suite imports it from the project's own environment.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SRC = HERE.parent.parent / "shared" / "comfyui"
TORCH_PINS = ["torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"]
# Not in requirements.txt, but imported at start (see ../shared/COMFYUI.md).
EXTRA_PACKAGES = ["requests"]
START_TIMEOUT_S = 300.0


class SetupError(RuntimeError):
    """The ComfyUI checkout, its environment or its models cannot be made ready."""


def source_dir(given: str | Path | None = None) -> Path:
    return Path(given or os.environ.get("STV_COMFYUI_SRC") or DEFAULT_SRC).resolve()


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "story-to-video" / "comfyui"
    return Path(os.environ.get("STV_COMFYUI_CACHE") or default)


def _log(msg: str) -> None:
    print(f"[comfyui-test-server] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_source(src: Path) -> None:
    for name in ("main.py", "requirements.txt", "comfy"):
        if not (src / name).exists():
            raise SetupError(f"{src} is not a ComfyUI checkout: {name} is missing")


def venv_python(src: Path) -> Path:
    """ComfyUI's own virtual environment (made once per requirements.txt)."""
    check_source(src)
    req = (src / "requirements.txt").read_bytes()
    key = hashlib.sha256(req + " ".join(TORCH_PINS + EXTRA_PACKAGES).encode()).hexdigest()[:12]
    venv = cache_dir() / f"venv-{key}"
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    if stamp.is_file():
        return python
    _log(f"making ComfyUI's environment in {venv} (about 2 minutes, 6 GB)")
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # One resolver pass, so the unpinned torch* lines of requirements.txt keep the pins.
    subprocess.run([*pip, *TORCH_PINS, "-r", str(src / "requirements.txt"), *EXTRA_PACKAGES],
                   check=True)
    stamp.write_text(json.dumps({"seconds": round(time.monotonic() - t, 1)}))
    _log(f"environment ready in {time.monotonic() - t:.0f}s")
    return python


def ensure_models(src: Path, python: Path, models: Path, profile: str = "tiny",
                  cpu: bool = True) -> Path:
    """Generate the random-weight model files that are missing (kept between runs)."""
    stamp = models / f".complete-{profile}"
    if stamp.is_file():
        return models
    _log(f"writing {profile} random-weight models to {models}")
    t = time.monotonic()
    cmd = [str(python), str(HERE / "comfyui_models.py"), profile, str(models)]
    subprocess.run(cmd + (["--cpu"] if cpu else []), cwd=src, check=True)
    stamp.write_text(json.dumps({"seconds": round(time.monotonic() - t, 1)}))
    return models


@dataclass
class Prepared:
    src: Path
    python: Path
    models: Path


def prepare(src: str | Path | None = None) -> Prepared:
    s = source_dir(src)
    python = venv_python(s)
    return Prepared(s, python, ensure_models(s, python, cache_dir() / "models-tiny"))


def command(p: Prepared, port: int, workdir: Path, extra: list[str] | None = None,
            cpu: bool = True) -> list[str]:
    """The command line that starts this ComfyUI on loopback, writing only into workdir."""
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    frontend = workdir / "frontend"  # no frontend package needed: a page is enough
    frontend.mkdir(exist_ok=True)
    (frontend / "index.html").write_text("<html><body>story-to-video test server</body></html>")
    return [str(p.python), str(p.src / "main.py"), *(["--cpu"] if cpu else []),
            "--listen", "127.0.0.1",
            "--port", str(port), "--base-directory", str(workdir),
            "--models-directory", str(p.models), "--front-end-root", str(frontend),
            "--database-url", f"sqlite:///{workdir / 'comfyui.db'}",
            *(extra or [])]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Server:
    """A started ComfyUI child process; `stop` ends it (also when it was SIGSTOPped)."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    workdir: Path
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""


def start(p: Prepared, workdir: Path, port: int | None = None,
          extra: list[str] | None = None, timeout_s: float = START_TIMEOUT_S) -> Server:
    port = port or free_port()
    cmd = command(p, port, workdir, extra)
    url = f"http://127.0.0.1:{port}"
    if answers(url):
        raise SetupError(f"something already answers at {url}")
    log_path = workdir / "comfyui.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, url, port, workdir, log_path, cmd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(server.log_text().splitlines()[-20:])
            raise SetupError(f"ComfyUI exited with {proc.returncode} while starting:\n{tail}")
        if answers(url):
            return server
        time.sleep(0.5)
    server.stop()
    raise SetupError(f"ComfyUI did not answer at {url} within {timeout_s:.0f}s; see {log_path}")


@contextlib.contextmanager
def running(workdir: Path, src: str | Path | None = None, extra: list[str] | None = None
            ) -> Iterator[Server]:
    server = start(prepare(src), workdir, extra=extra)
    try:
        yield server
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(prog="comfyui-test-server", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["setup", "start", "models"])
    ap.add_argument("--comfyui", help="ComfyUI checkout (default $STV_COMFYUI_SRC or "
                    f"{DEFAULT_SRC})")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where ComfyUI writes (default: a folder in the cache)")
    ap.add_argument("--out", type=Path, help="models: output folder")
    ap.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--gpu", action="store_true", help="models: import ComfyUI without --cpu")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        if args.action == "models":
            src = source_dir(args.comfyui)
            python = Path(sys.executable) if args.gpu else venv_python(src)
            out = args.out or cache_dir() / f"models-{args.profile}"
            ensure_models(src, python, out, args.profile, cpu=not args.gpu)
            print(out)
            return 0
        prepared = prepare(args.comfyui)
        if args.action == "setup":
            print(json.dumps({"python": str(prepared.python), "models": str(prepared.models)}))
            return 0
        workdir = args.workdir or cache_dir() / "workdir"
        server = start(prepared, workdir, args.port, extra)
        (workdir / "server.json").write_text(json.dumps({"url": server.url, "pid": server.pid}))
        print(server.url, flush=True)
        _log(f"ComfyUI {server.url} (pid {server.pid}); log {server.log_path}; Ctrl-C stops")
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            server.stop()
        return 0
    except (SetupError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
