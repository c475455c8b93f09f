"""Atomic file output: write beside the target, fsync, rename. Readers never see half a file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path with the same suffix; rename onto `final` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: Path, data: Any) -> None:
    write_text_atomic(final, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def remove_partials(folder: Path) -> list[Path]:
    """Delete leftovers of writes that were killed mid-way; returns what was removed."""
    gone = []
    if folder.is_dir():
        for p in folder.rglob(".*.partial-*"):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
