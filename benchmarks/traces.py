"""What `comfyui_gpu.py --vram` recorded (`benchmarks/results/vram-*.json`), read once for the
VRAM and time calibrations: the rows, and each row's torch trace from its decode on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Trace = list[tuple[float, float]]  # (s from the run's start, GiB torch allocated)
Size = tuple[int, int, int]  # width, height, frames


def dims(size: str) -> Size:
    """'WxHxF' as (width, height, frames)."""
    w, h, f = (int(x) for x in size.split("x"))
    return w, h, f


def name(size: Size) -> str:
    """(width, height, frames) as 'WxHxF'."""
    return "x".join(map(str, size))


def vram_rows(results: Path) -> Iterator[dict[str, Any]]:
    """The --vram rows that measured something, from every run in `results`."""
    for path in sorted(results.glob("vram-*.json")):
        yield from (r for r in json.loads(path.read_text()).get("vram", [])
                    if not r.get("error"))


def decode_trace(row: dict[str, Any]) -> tuple[float, Trace] | None:
    """(when the decode prompt began, torch's samples from then on), None without a trace."""
    trace = row.get("trace") or {}
    start = next((t for t, label in trace.get("marks", []) if label.endswith(" decode")), None)
    if start is None or not trace.get("torch_active"):
        return None
    return start, [(t, g) for t, g in trace["torch_active"] if t >= start]


def peak_counter(row: dict[str, Any]) -> bool:
    """Whether torch was read through its peak counter (no peak falls between two reads)
    rather than sampled from /system_stats."""
    return "peak" in (row.get("trace") or {}).get("torch_source", "")
