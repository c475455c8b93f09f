"""Claims on work items (a shot, a plan) shared by several workers on one machine or share.

A claim is a file created with O_EXCL holding the owner's host and pid. A claim whose
owner process is gone (killed worker) is stale and is taken over: on this host when its pid
is gone; from another host (a shared output folder) when its owner stopped refreshing it.
Every process refreshes the mtime of the claims it holds every `REFRESH_S` seconds; a claim
of another host not refreshed for `STV_CLAIM_STALE_S` seconds (default 120) is stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REFRESH_S = 10.0
_held: set[Path] = set()
_held_lock = threading.Lock()
_refresher: threading.Thread | None = None


def stale_after_s() -> float:
    return float(os.environ.get("STV_CLAIM_STALE_S", "120"))


def _refresh_forever() -> None:
    while True:
        time.sleep(REFRESH_S)
        with _held_lock:
            paths = list(_held)
        for path in paths:
            with contextlib.suppress(OSError):
                os.utime(path)


def _hold(path: Path) -> None:
    """Keep the claim's lease fresh while this process lives (one daemon thread for all)."""
    global _refresher
    with _held_lock:
        _held.add(path)
        if _refresher is None or not _refresher.is_alive():
            _refresher = threading.Thread(target=_refresh_forever, name="claim-refresher",
                                          daemon=True)
            _refresher.start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}


def claim(path: Path) -> bool:
    """Take the claim; True if it is ours now. Stale claims of dead local pids are taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(path):
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(_owner(), fh)
        _hold(path)
        return True
    return False


def _owner_of(path: Path) -> dict[str, object] | None:
    """The claim's owner; None when the claim is unreadable or not what claim() writes."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # cut off mid-write by a killed worker, or not a claim at all
    ok = (isinstance(owner, dict) and isinstance(owner.get("pid"), int)
          and isinstance(owner.get("host"), str))
    return owner if ok else None


def _stale(path: Path) -> bool:
    owner = _owner_of(path)
    if owner is None:
        return True
    if owner["host"] != socket.gethostname():  # no pid to check: its lease must be fresh
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > stale_after_s()
    pid = owner["pid"]
    return not (isinstance(pid, int) and pid > 0 and _alive(pid))


def is_stale(path: Path) -> bool:
    """True when the claim's owner is gone (or the claim is unreadable); False while it lives."""
    return path.exists() and _stale(path)


def release(path: Path) -> None:
    with _held_lock:
        _held.discard(path)
    owner = _owner_of(path)
    if owner is not None and owner["pid"] == os.getpid() and \
            owner["host"] == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def claimed(path: Path, wait_s: float = 3600.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the claim for the block, waiting for another holder to finish first."""
    deadline = time.monotonic() + wait_s
    while not claim(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} stayed claimed by another worker for {wait_s:.0f}s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        release(path)
