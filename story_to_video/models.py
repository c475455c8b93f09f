"""The shot plan: what every stage after the LLM consumes.

Two layers: the *draft* models are what the LLM is asked to produce (creative text only,
small enough for a 135M model under a grammar); the *plan* models add the technical fields
(frames, fps, size, seed) that code derives, and enforce what Wan needs.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

CameraMove = Literal[
    "static", "pan-left", "pan-right", "tilt-up", "tilt-down", "zoom-in", "zoom-out",
    "dolly-in", "dolly-out", "tracking", "orbit", "handheld",
]
CAMERA_MOVES: tuple[str, ...] = CameraMove.__args__  # type: ignore[attr-defined]

MIN_FRAMES, MAX_FRAMES = 5, 241
# A target is "near" when the plan lands within this share of it (frames snap to 4k+1).
DURATION_TOLERANCE = 0.2


def _strip(v: str) -> str:
    return " ".join(v.split())


class Character(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=60)
    look: str = Field(min_length=3, max_length=300, description="face, hair, build, age")
    wardrobe: str = Field(min_length=3, max_length=300)
    # A picture of the character the user gives: shots it leads start from it.
    image: SkipJsonSchema[str | None] = Field(default=None, max_length=4096)

    _clean = field_validator("name", "look", "wardrobe")(_strip)


class Bible(BaseModel):
    """Style and character bible: produced once, carried verbatim into every shot."""

    model_config = ConfigDict(extra="ignore")
    style: str = Field(min_length=3, max_length=300)
    palette: str = Field(min_length=3, max_length=200)
    characters: list[Character] = Field(min_length=1, max_length=4)

    _clean = field_validator("style", "palette")(_strip)

    @field_validator("characters", mode="before")
    @classmethod
    def _drop_repeats(cls, v: object) -> object:
        """Small models repeat a character verbatim; keep the first of each name."""
        if not isinstance(v, list):
            return v
        seen: set[str] = set()
        out = []
        for c in v:
            name = c.get("name") if isinstance(c, dict) else None
            key = " ".join(str(name).split()).casefold() if isinstance(name, str) else None
            if key is not None and key in seen:
                continue
            if key is not None:
                seen.add(key)
            out.append(c)
        return out

    def character(self, name: str) -> Character | None:
        for c in self.characters:
            if c.name.casefold() == name.casefold():
                return c
        return None


class DraftShot(BaseModel):
    model_config = ConfigDict(extra="ignore")
    action: str = Field(min_length=8, max_length=400, description="who does what, where")
    camera: CameraMove
    characters: list[str] = Field(default_factory=list, max_length=4)

    _clean = field_validator("action")(_strip)

    @field_validator("camera", mode="before")
    @classmethod
    def _camera(cls, v: object) -> object:
        return re.sub(r"[\s_]+", "-", v.strip().lower()) if isinstance(v, str) else v


class DraftScene(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: str = Field(min_length=2, max_length=80)
    setting: str = Field(min_length=3, max_length=300, description="place, time of day, light")
    shots: list[DraftShot] = Field(min_length=1, max_length=8)

    _clean = field_validator("title", "setting")(_strip)


class DraftScenes(BaseModel):
    model_config = ConfigDict(extra="ignore")
    scenes: list[DraftScene] = Field(min_length=1, max_length=20)


class Shot(BaseModel):
    """One clip for the video engine. Frames obey Wan's 4k+1 rule; sizes are multiples of 16."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^s\d{2}_sh\d{2}$")
    scene_index: int = Field(ge=0)
    shot_index: int = Field(ge=0)
    action: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    frames: int = Field(ge=MIN_FRAMES, le=MAX_FRAMES)
    fps: int = Field(ge=4, le=60)
    width: int = Field(ge=128, le=2048, multiple_of=16)
    height: int = Field(ge=128, le=2048, multiple_of=16)
    seed: int = Field(ge=0, le=2**53)
    camera: CameraMove = "static"
    characters: list[str] = Field(default_factory=list)
    start_image: str | None = None
    continuity_hint: str | None = None

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            nearest = 4 * round((v - 1) / 4) + 1
            raise ValueError(
                f"frames must be 4k+1 (e.g. 33, 49, 81, 121, 161); nearest {nearest}"
            )
        return v

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


class Scene(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    title: str
    setting: str
    shots: list[Shot] = Field(min_length=1)


class ShotPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    idea: str = Field(min_length=1)
    story: str = Field(min_length=1)
    style: str
    target_seconds: float = Field(gt=0)
    prompt_version: str
    bible: Bible
    scenes: list[Scene] = Field(min_length=1)

    @property
    def shots(self) -> list[Shot]:
        return [shot for scene in self.scenes for shot in scene.shots]

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.shots)

    @model_validator(mode="after")
    def _consistent(self) -> ShotPlan:
        ids = [s.id for s in self.shots]
        if len(set(ids)) != len(ids):
            raise ValueError("shot ids must be unique")
        for shot in self.shots:
            for name in shot.characters:
                if self.bible.character(name) is None:
                    raise ValueError(f"shot {shot.id} names character {name!r} not in the bible")
        # A plan can never be shorter than one minimal clip per shot; judge only what is possible.
        floor = sum(MIN_FRAMES / s.fps for s in self.shots)
        target = max(self.target_seconds, floor)
        if abs(self.duration_s - target) > DURATION_TOLERANCE * target + 1.0:
            raise ValueError(
                f"plan lasts {self.duration_s:.1f}s, not near the target {target:.1f}s"
            )
        return self
