"""Start images: where each shot's first frame comes from, and the files that hold them.

`video.start_images` chooses: none (text to video), chain (a scene's later shots start from
the last frame of the shot before), keyframe (a keyframe generated for every shot) or
keyframe+chain (a keyframe for a scene's first shot, then chained). Images the user gives
count in every mode: per shot (plan JSON `start_image`, a batch entry's `start_images`) and
per character (bible `image`, a batch entry's `character_images`; the shot's first named
character with an image). A user's shot image wins over a character image, which wins over
a chain or a keyframe.

Every start image a clip uses lies in the run folder's `keyframes/` under a name that holds
its identity: a keyframe's key (its prompt, seed, size and workflow), the key of the clip a
chained frame was taken from, or a user image's content hash. The shot's key includes that
name (`RunFolder.shot_key`), so a changed keyframe re-renders its shot and, through the
chained frames, the shots chained after it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import prompts

from .atomic import atomic_path, write_json_atomic
from .models import Shot, ShotPlan
from .run import InputError, RunFolder, safe_name

log = logging.getLogger(__name__)
KEYFRAME_DIR = "keyframes"
Kind = Literal["none", "user", "character", "chain", "keyframe"]


class StartImageError(InputError):
    """A start image cannot be used or made; the message names the shot and the file."""


@dataclass(frozen=True)
class Source:
    kind: Kind
    image: str | None = None  # user or character image (a path)
    after: str | None = None  # chain: the shot whose last frame this one starts from


@dataclass(frozen=True)
class UserImages:
    """Images given outside the plan (a batch entry): per shot id, per character name."""

    shots: dict[str, str] = field(default_factory=dict)
    characters: dict[str, str] = field(default_factory=dict)


def sources(plan: ShotPlan, mode: str, user: UserImages | None = None) -> dict[str, Source]:
    """Each shot's start-image source, by shot id."""
    user = user or UserImages()
    chars = {c.name.casefold(): c.image for c in plan.bible.characters if c.image}
    chars.update({k.casefold(): v for k, v in user.characters.items()})
    out: dict[str, Source] = {}
    for scene in plan.scenes:
        for n, shot in enumerate(scene.shots):
            given = user.shots.get(shot.id) or shot.start_image
            face = next((chars[c.casefold()] for c in shot.characters
                         if c.casefold() in chars), None)
            chained = "chain" in mode and n > 0
            if given:
                out[shot.id] = Source("user", image=given)
            elif chained:
                out[shot.id] = Source("chain", after=scene.shots[n - 1].id)
            elif face:
                out[shot.id] = Source("character", image=face)
            elif mode == "keyframe" or (mode == "keyframe+chain" and n == 0):
                out[shot.id] = Source("keyframe")
            else:
                out[shot.id] = Source("none")
    return out


def shot_deps(plan: ShotPlan, shot: Shot, mode: str, user: UserImages | None = None
              ) -> tuple[str, ...]:
    """Shots this one must wait for: the one whose last frame it starts from."""
    after = sources(plan, mode, user)[shot.id].after
    return (after,) if after else ()


def keyframe_prompt(plan: ShotPlan, shot: Shot) -> str:
    """The keyframe's prompt: the shot, each of its characters described once as the bible
    describes them, the scene's setting and the style (one still, so no camera move)."""
    scene = plan.scenes[shot.scene_index]
    names = list(dict.fromkeys(n.casefold() for n in shot.characters))
    chars = [c for n in names if (c := plan.bible.character(n)) is not None]
    text = prompts.render("keyframe_prompt", action=shot.action, characters=chars,
                          setting=scene.setting, bible=plan.bible)
    return " ".join(text.split())


# -- image files ----------------------------------------------------------------------------

def fit_image(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover width x height and centre-cropped: the shot's size, never stretched."""
    out: Image.Image = ImageOps.fit(img.convert("RGB"), (width, height),
                                    Image.Resampling.LANCZOS)
    return out


def save_png(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def read_user_image(path: Path, shot: Shot) -> Image.Image:
    """A user's image, checked; StartImageError names the shot and the file."""
    if not path.is_file():
        raise StartImageError(f"shot {shot.id}: start image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            rgb: Image.Image = img.convert("RGB")
            return rgb
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise StartImageError(f"shot {shot.id}: start image {path} is not a readable image "
                              f"({type(err).__name__}: {err})") from None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


# -- keyframes: who makes them --------------------------------------------------------------

class KeyframeEngine(Protocol):
    name: str

    def keyframe_fingerprint(self) -> str:
        """Changes when the keyframe for the same prompt would change (resume key)."""
        ...

    def render_keyframe(self, shot: Shot, prompt: str, out_path: Path) -> dict[str, Any]:
        """Write one still at the shot's size to out_path (PNG); returns details."""
        ...


class StartImages:
    """Resolves each shot's start image to a file in the run folder, making it when it can:
    a user's image fitted to the shot, the last frame of the finished clip before, or a
    keyframe already rendered. `prepared` returns the shot to render (start_image set) or
    None while what it starts from is not finished."""

    def __init__(self, plan: ShotPlan, folder: RunFolder, mode: str,
                 clip_fingerprint: Callable[[], str], keyframer: KeyframeEngine | None = None,
                 user: UserImages | None = None) -> None:
        self.plan, self.folder, self.mode = plan, folder, mode
        self.clip_fingerprint = clip_fingerprint
        self.keyframer = keyframer
        self.sources = sources(plan, mode, user)
        self.by_id = {s.id: s for s in plan.shots}

    def _without_plan_images(self) -> StartImages:
        self.sources = {k: Source("none") for k in self.sources}
        return self

    @property
    def active(self) -> bool:
        return any(s.kind != "none" for s in self.sources.values())

    @property
    def dir(self) -> Path:
        return self.folder.root / KEYFRAME_DIR

    def deps(self, shot: Shot) -> tuple[str, ...]:
        after = self.sources[shot.id].after
        return (after,) if after else ()

    # -- keyframes ------------------------------------------------------------------------
    def keyframe_shots(self) -> list[Shot]:
        return [s for s in self.plan.shots if self.sources[s.id].kind == "keyframe"]

    def keyframe_key(self, shot: Shot) -> str:
        if self.keyframer is None:
            raise StartImageError(f"shot {shot.id} needs a keyframe, but this engine makes none")
        raw = json.dumps([keyframe_prompt(self.plan, shot), shot.negative_prompt, shot.seed,
                          shot.width, shot.height, self.keyframer.keyframe_fingerprint()])
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def keyframe_path(self, shot: Shot) -> Path:
        return self.dir / f"{safe_name(shot.id)}-kf-{self.keyframe_key(shot)}.png"

    def keyframe_done(self, shot: Shot) -> bool:
        path = self.keyframe_path(shot)
        return path.is_file() and path.with_suffix(".json").is_file()

    def render_keyframe(self, shot: Shot) -> dict[str, Any]:
        """Render one keyframe (the caller holds its claim); its record beside it."""
        assert self.keyframer is not None
        out = self.keyframe_path(shot)
        out.parent.mkdir(parents=True, exist_ok=True)
        prompt = keyframe_prompt(self.plan, shot)
        details = self.keyframer.render_keyframe(shot, prompt, out)
        with Image.open(out) as img:
            size = img.size
        if size != (shot.width, shot.height):  # a user's image workflow of its own size
            log.warning("%s: keyframe came back %dx%d; scaled and cropped to %dx%d", shot.id,
                        *size, shot.width, shot.height)
            with Image.open(out) as img:
                save_png(fit_image(img, shot.width, shot.height), out)
        record = {"shot_id": shot.id, "prompt": prompt, "engine": self.keyframer.name,
                  "image": out.name, "details": details}
        write_json_atomic(out.with_suffix(".json"), record)
        return record

    # -- the shot to render -----------------------------------------------------------------
    def prepared(self, shot: Shot, *, strict: bool = False) -> Shot | None:
        """The shot with its start image (a file in keyframes/); None while it waits for
        a clip or keyframe not finished yet (strict: raise StartImageError instead)."""
        src = self.sources[shot.id]
        if src.kind == "none":
            return shot.model_copy(update={"start_image": None})
        path: Path | None
        if src.kind in ("user", "character"):
            assert src.image is not None
            path = self._user_image(shot, Path(src.image))
        elif src.kind == "chain":
            path = self._chained(shot, strict)
        else:
            path = self.keyframe_path(shot) if self.keyframe_done(shot) else None
            if path is None and strict:
                raise StartImageError(f"shot {shot.id}: its keyframe was not rendered")
        return None if path is None else shot.model_copy(update={"start_image": str(path)})

    def _user_image(self, shot: Shot, src: Path) -> Path:
        img = read_user_image(src, shot)
        if img.size != (shot.width, shot.height):
            log.info("%s: start image %s is %dx%d; scaled and cropped to %dx%d", shot.id,
                     src, *img.size, shot.width, shot.height)
            img = fit_image(img, shot.width, shot.height)
        data = np.asarray(img).tobytes()
        out = self.dir / f"{safe_name(shot.id)}-user-{digest(data)}.png"
        return out if out.is_file() else save_png(img, out)

    def _chained(self, shot: Shot, strict: bool) -> Path | None:
        after = self.sources[shot.id].after
        assert after is not None
        prev = self.prepared(self.by_id[after], strict=strict)
        record = None
        if prev is not None:
            key = self.folder.shot_key(prev, self.clip_fingerprint())
            record = self.folder.finished_record(prev, key)
        if record is None:
            if strict:
                raise StartImageError(
                    f"shot {shot.id} starts from the last frame of {after}, which has no "
                    "finished clip (it failed or was refused); render it first")
            return None
        out = self.dir / f"{safe_name(shot.id)}-chain-{record['key']}.png"
        if not out.is_file():
            from .engines.video_io import read_frame

            clip = self.folder.clips / record["clip"]
            frame = read_frame(clip, int(record["frames"]) - 1)
            img = Image.fromarray(frame)
            if img.size != (shot.width, shot.height):
                img = fit_image(img, shot.width, shot.height)
            save_png(img, out)
        return out

    def source_label(self, shot: Shot) -> str:
        src = self.sources[shot.id]
        return f"chain after {src.after}" if src.kind == "chain" else src.kind

    # -- before any work --------------------------------------------------------------------
    def check(self) -> list[Shot]:
        """Every user and character image readable (StartImageError names the file), and
        the shots as the engine will get them (a marker where a start image will be), for
        the engine's own check."""
        out = []
        for shot in self.plan.shots:
            src = self.sources[shot.id]
            if src.image is not None:
                read_user_image(Path(src.image), shot)
            out.append(shot.model_copy(update={
                "start_image": None if src.kind == "none" else f"({src.kind})"}))
        return out


def for_run(mode: str, plan: ShotPlan, folder: RunFolder, engine: Any,
            user: UserImages | None = None) -> StartImages:
    """The run's start images for this engine. A workflow with no start-image input
    (text to video) gets none: said once in the log, not silently."""
    starts = StartImages(plan, folder, mode, engine.fingerprint,
                         engine if hasattr(engine, "render_keyframe") else None, user)
    if starts.active and not getattr(engine, "takes_start_image", False):
        log.warning("start images (video.start_images = %s, or images given) are not used: "
                    "the workflow has no start_image input; use an image-to-video or TI2V "
                    "workflow (wan22_14b_i2v, wan22_ti2v_5b)", mode)
        return StartImages(plan, folder, "none", engine.fingerprint, None,
                           UserImages())._without_plan_images()
    return starts
