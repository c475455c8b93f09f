"""A run's identity and folder: validated inputs, where every file goes, what is done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import remove_partials, write_json_atomic
from .models import Shot, ShotPlan

log = logging.getLogger(__name__)

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

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: written to run.json in its folder."""
        return {"idea": self.idea, "scenes": self.scenes, "target_seconds": self.target_seconds,
                "style": self.style, "key": self.key}



IDENTITY_FIELDS = ("idea", "scenes", "target_seconds", "style")


def _is_identity(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("idea"), str)
            and isinstance(data.get("scenes"), int)
            and isinstance(data.get("target_seconds"), (int, float))
            and isinstance(data.get("style"), str))


def _describe(ident: dict[str, Any]) -> str:
    return (f"idea {ident['idea']!r} ({ident['scenes']} scenes, {ident['target_seconds']:g}s, "
            f"style {ident['style']!r})")


def set_aside(path: Path, why: str) -> Path:
    """Rename a corrupt run file out of the way (kept for a look), logging both names."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():  # keep every earlier one
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return target  # another worker set it aside first
    log.warning("%s is corrupt (%s): set aside as %s; it will be rebuilt", path, why,
                target.name)
    return target


def _read_json(path: Path) -> Any:
    """Parsed JSON of a run file; None when missing; ValueError when unreadable."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


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
        self._claim_identity()
        self._check_manifest()
        return remove_partials(self.root)

    @property
    def identity_path(self) -> Path:
        return self.root / "run.json"

    def check_identity(self) -> None:
        """Refuse a folder that holds another run: two ideas whose --run-name reduce to one
        folder name must never share (or resume) each other's work."""
        if not self.root.is_dir():
            return
        mine, theirs = self.spec.identity(), self._stored_identity()
        if theirs is not None and any(theirs[k] != mine[k] for k in IDENTITY_FIELDS):
            raise InputError(
                f"run folder {self.root} already holds another run: {_describe(theirs)}; this "
                f"run is {_describe(mine)}. Give this run another --run-name (or none: the "
                "default folder name includes the idea and a hash of the inputs)")

    def _claim_identity(self) -> None:
        self.check_identity()
        for _ in range(3):
            if self.identity_path.is_file():
                return
            # Another worker preparing the same run may sweep our temporary file.
            with contextlib.suppress(FileNotFoundError):
                write_json_atomic(self.identity_path, self.spec.identity())
        self.check_identity()

    def _stored_identity(self) -> dict[str, Any] | None:
        """The inputs of the run this folder holds (run.json, or the plan of a folder made
        before run.json existed); None for a new folder."""
        try:
            data = _read_json(self.identity_path)
            if data is not None and not _is_identity(data):
                raise ValueError("not the inputs of a run")
        except ValueError as err:
            set_aside(self.identity_path, _first_line(err))
            data = None
        if data is not None:
            return dict(data)
        plan = self.load_plan(check_inputs=False)
        return None if plan is None else {
            "idea": plan.idea, "scenes": len(plan.scenes),
            "target_seconds": plan.target_seconds, "style": plan.style}

    def _check_manifest(self) -> None:
        try:
            data = _read_json(self.manifest_path)
            if data is not None and not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            set_aside(self.manifest_path, str(err))

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

    def load_plan(self, check_inputs: bool = True) -> ShotPlan | None:
        """The saved plan; None when there is none, or when it was corrupt or made for other
        inputs (then it is set aside and the caller plans again)."""
        try:
            raw = self.plan_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            plan = ShotPlan.model_validate_json(raw)  # ValueError when cut off or invalid
        except (ValueError, RecursionError) as err:
            set_aside(self.plan_path, _first_line(err))
            return None
        s = self.spec
        if check_inputs and (plan.idea, plan.target_seconds, plan.style, len(plan.scenes)) != (
                s.idea, s.target_seconds, s.style, s.scenes):
            set_aside(self.plan_path, "it was made for other inputs")
            return None
        return plan

    def load_story(self) -> str | None:
        """The saved story; None when there is none or it was unusable (set aside)."""
        try:
            text = self.story_path.read_bytes().decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except ValueError as err:
            set_aside(self.story_path, _first_line(err))
            return None
        if len(text) < 20 or "\x00" in text:
            set_aside(self.story_path, "empty, cut short or binary")
            return None
        return text

    def save_plan(self, plan: ShotPlan) -> None:
        write_json_atomic(self.plan_path, plan.model_dump(mode="json"))

    @staticmethod
    def shot_key(shot: Shot, engine_fingerprint: str) -> str:
        # A start image counts by its file name, which holds its identity (keyframe key,
        # chained clip's key, content hash: story_to_video.start_images), not by where the
        # run folder happens to be.
        if shot.start_image:
            shot = shot.model_copy(update={"start_image": Path(shot.start_image).name})
        raw = shot.model_dump_json() + "|" + engine_fingerprint
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def clip_path(self, shot: Shot, key: str) -> Path:
        return inside(self.clips, f"{safe_name(shot.id)}-{key}.mp4")

    def record_path(self, shot: Shot, key: str) -> Path:
        return self.clip_path(shot, key).with_suffix(".json")

    def finished_record(self, shot: Shot, key: str) -> dict[str, Any] | None:
        """The record of a finished clip for exactly these inputs, if there is one. A corrupt
        record is set aside, and the shot counts as not done (it is rendered again)."""
        rec, clip = self.record_path(shot, key), self.clip_path(shot, key)
        if not (rec.is_file() and clip.is_file()):
            return None
        try:
            data = _read_json(rec)
            problem = _record_problem(data, shot, clip.name)
        except ValueError as err:
            problem = _first_line(err)
        if problem:
            set_aside(rec, problem)
            return None
        checked: dict[str, Any] = data
        return checked


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _record_problem(data: Any, shot: Shot, clip_name: str) -> str:
    """Why a shot record cannot be trusted, or "" when it can."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("shot_id") != shot.id or data.get("clip") != clip_name:
        return "it names another shot or clip"
    for name in ("frames", "fps", "width", "height"):
        value = data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"{name} is missing or not a positive whole number"
    return ""
