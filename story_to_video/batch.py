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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import EngineName
from .textsafe import clean

MAX_BATCH_BYTES = 16 * 2**20
MAX_ENTRIES = 10_000


class BatchEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    idea: str = Field(min_length=1, max_length=1000)
    scenes: int | None = Field(default=None, ge=1, le=20)
    target_seconds: float | None = Field(default=None, gt=0, le=3600)
    style: str | None = Field(default=None, min_length=1, max_length=200)
    engine: EngineName | None = None
    run_name: str | None = Field(default=None, min_length=1, max_length=200)
    # Start images the user gives: per shot id ("s01_sh01") and per character name.
    start_images: dict[str, str] | None = Field(default=None, max_length=200)
    character_images: dict[str, str] | None = Field(default=None, max_length=20)

    @field_validator("idea", "style", "run_name", mode="before")
    @classmethod
    def _one_line(cls, v: object) -> object:
        """Control characters out, whitespace collapsed: "  " is an empty idea."""
        return " ".join(clean(v).split()) if isinstance(v, str) else v


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
            except RecursionError:
                out.problems.append(BatchProblem(f"line {n}", "JSON nested too deeply"))
                continue
            _validate(f"line {n}", raw, out)
            _check_count(out)
        return out
    try:
        data = tomllib.loads(text) if fmt == "toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise BatchFileError(f"batch file is not valid {fmt.upper()}: {err}") from None
    except RecursionError:
        raise BatchFileError(f"batch file is {fmt.upper()} nested too deeply") from None
    items = data.get("ideas") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BatchFileError(f"a {fmt.upper()} batch needs a list of ideas (key 'ideas')")
    for i, raw in enumerate(items, start=1):
        _validate(f"entry {i}", raw, out)
        _check_count(out)
    return out


def _check_count(out: ParsedBatch) -> None:
    if len(out.entries) > MAX_ENTRIES:
        raise BatchFileError(f"batch has more than {MAX_ENTRIES:,} ideas: split it")


def load_batch(path: str | Path) -> ParsedBatch:
    p = Path(path)
    if not p.is_file():
        raise BatchFileError(f"batch file {p} does not exist")
    fmt = {".jsonl": "jsonl", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}.get(p.suffix)
    if fmt is None:
        raise BatchFileError(f"batch file {p}: use .jsonl, .toml, .yaml or .yml")
    try:
        if p.stat().st_size > MAX_BATCH_BYTES:
            raise BatchFileError(f"batch file {p} is larger than {MAX_BATCH_BYTES // 2**20} MiB")
        text = p.read_bytes().decode("utf-8-sig")  # a BOM from Windows editors is fine
    except OSError as err:
        raise BatchFileError(f"batch file {p} cannot be read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise BatchFileError(f"batch file {p} is not UTF-8 text (byte {err.start})") from None
    return parse_batch_text(text, fmt)
