"""A run's identity and folder: validated inputs, where every file goes, what is done."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import remove_partials, write_json_atomic
from .models import Shot, ShotPlan

MAX_SCENES = 20
MAX_TARGET_SECONDS = 3600.0


class InputError(ValueError):
    """A run parameter is unusable; raised before any work starts."""


def safe_name(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug: never a path separator, never '..', never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-").lower()[:max_len].strip("-")
    return slug or "run"


def inside(folder: Path, name: str) -> Path:
    """folder/name, refusing any name that would land outside folder."""
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise InputError(f"refusing path {name!r}: it leaves {folder}")
    return target


@dataclass(frozen=True)
class RunSpec:
    idea: str
    scenes: int
    target_seconds: float
    style: str
    engine: str
    output_dir: Path
    run_name: str | None = None

    def __post_init__(self) -> None:
        idea = " ".join(self.idea.split())
        if not idea:
            raise InputError("idea is empty: give a one-line idea, e.g. --idea 'a lighthouse "
                             "keeper befriends a whale'")
        if len(idea) > 1000:
            raise InputError(f"idea is {len(idea)} characters; keep it to one line (<= 1000)")
        object.__setattr__(self, "idea", idea)
        object.__setattr__(self, "target_seconds", float(self.target_seconds))  # 10 == 10.0
        if not 1 <= self.scenes <= MAX_SCENES:
            raise InputError(f"scenes must be between 1 and {MAX_SCENES}, got {self.scenes}")
        if not 0 < self.target_seconds <= MAX_TARGET_SECONDS:
            raise InputError(f"target_seconds must be in (0, {MAX_TARGET_SECONDS:.0f}], "
                             f"got {self.target_seconds}")

    @property
    def key(self) -> str:
        raw = json.dumps([self.idea, self.scenes, self.target_seconds, self.style])
        return hashlib.sha256(raw.encode()).hexdigest()[:8]

    @property
    def dir(self) -> Path:
        name = safe_name(self.run_name) if self.run_name else f"{safe_name(self.idea)}-{self.key}"
        return self.output_dir / name


class RunFolder:
    """Files of one run. Finished files are never overwritten; partial ones are swept."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.root = spec.dir

    def prepare(self) -> list[Path]:
        """Create the folder and prove it is writable before any work; sweep partials."""
        try:
            self.clips.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise InputError(f"output folder {self.root} is not writable: {err.strerror}") from None
        free = shutil.disk_usage(self.root).free
        if free < 50 * 2**20:
            raise InputError(f"output folder {self.root} has only {free / 2**20:.0f} MiB free")
        return remove_partials(self.root)

    @property
    def clips(self) -> Path:
        return self.root / "clips"

    @property
    def story_path(self) -> Path:
        return self.root / "story.md"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def final_path(self) -> Path:
        return self.root / "final.mp4"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def load_plan(self) -> ShotPlan | None:
        if not self.plan_path.is_file():
            return None
        return ShotPlan.model_validate_json(self.plan_path.read_text(encoding="utf-8"))

    def save_plan(self, plan: ShotPlan) -> None:
        write_json_atomic(self.plan_path, plan.model_dump(mode="json"))

    @staticmethod
    def shot_key(shot: Shot, engine_fingerprint: str) -> str:
        raw = shot.model_dump_json() + "|" + engine_fingerprint
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def clip_path(self, shot: Shot, key: str) -> Path:
        return inside(self.clips, f"{safe_name(shot.id)}-{key}.mp4")

    def record_path(self, shot: Shot, key: str) -> Path:
        return self.clip_path(shot, key).with_suffix(".json")

    def finished_record(self, shot: Shot, key: str) -> dict[str, Any] | None:
        """The record of a finished clip for exactly these inputs, if there is one."""
        rec, clip = self.record_path(shot, key), self.clip_path(shot, key)
        if rec.is_file() and clip.is_file():
            data: dict[str, Any] = json.loads(rec.read_text(encoding="utf-8"))
            return data
        return None
