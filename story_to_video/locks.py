"""Claims on work items (a shot, a plan) shared by several workers on one machine or share.

A claim is a file created with O_EXCL holding the owner's host and pid. A claim whose
owner process is gone (killed worker) is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path


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
        return True
    return False


def _stale(path: Path) -> bool:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # an unreadable claim was cut off mid-write by a killed worker
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: cannot check, assume alive
    return not _alive(int(owner.get("pid", 0)))


def release(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        owner = json.loads(path.read_text())
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
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
