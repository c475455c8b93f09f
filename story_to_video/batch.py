"""Batch files: one video per idea. JSONL (one object per line), TOML or YAML.

A broken entry is reported with its line (or index) and skipped; the rest still run.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class BatchEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    idea: str = Field(min_length=1)
    scenes: int | None = Field(default=None, ge=1, le=20)
    target_seconds: float | None = Field(default=None, gt=0, le=3600)
    style: str | None = None
    engine: str | None = None
    run_name: str | None = None


@dataclass(frozen=True)
class BatchProblem:
    where: str  # "line 3" or "entry 2"
    reason: str


@dataclass
class ParsedBatch:
    entries: list[tuple[str, BatchEntry]]  # (where, entry)
    problems: list[BatchProblem]


class BatchFileError(ValueError):
    pass


def _validate(where: str, raw: Any, out: ParsedBatch) -> None:
    if isinstance(raw, str):
        raw = {"idea": raw}
    try:
        out.entries.append((where, BatchEntry.model_validate(raw)))
    except ValidationError as err:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}"
                            for e in err.errors())
        out.problems.append(BatchProblem(where, reasons))


def parse_batch_text(text: str, fmt: str) -> ParsedBatch:
    out = ParsedBatch([], [])
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                out.problems.append(BatchProblem(f"line {n}", f"not JSON: {err.msg}"))
                continue
            _validate(f"line {n}", raw, out)
        return out
    try:
        data = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise BatchFileError(f"batch file is not valid {fmt.upper()}: {err}") from None
    items = data.get("ideas") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BatchFileError(f"a {fmt.upper()} batch needs a list of ideas (key 'ideas')")
    for i, raw in enumerate(items, start=1):
        _validate(f"entry {i}", raw, out)
    return out


def load_batch(path: str | Path) -> ParsedBatch:
    p = Path(path)
    if not p.is_file():
        raise BatchFileError(f"batch file {p} does not exist")
    fmt = {".jsonl": "jsonl", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}.get(p.suffix)
    if fmt is None:
        raise BatchFileError(f"batch file {p}: use .jsonl, .toml, .yaml or .yml")
    return parse_batch_text(p.read_text(encoding="utf-8"), fmt)
