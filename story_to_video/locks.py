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
    if owner["host"] != socket.gethostname():
        return False  # another machine's process: cannot check, assume alive
    pid = owner["pid"]
    return not (isinstance(pid, int) and pid > 0 and _alive(pid))


def release(path: Path) -> None:
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
