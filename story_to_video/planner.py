"""Story and shot plan from an LLM: structured output, validation, bounded repair.

The LLM writes only creative text (story, bible, scenes and shot actions). Code derives the
technical fields (frames, fps, size, seed) so that every plan obeys Wan's rules.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

import prompts

from .config import VideoSettings
from .jsonextract import JSONExtractError, extract_json_object
from .llm.base import LLMBackend, LLMError, Message
from .models import (
    CAMERA_MOVES,
    DURATION_TOLERANCE,
    MAX_FRAMES,
    MIN_FRAMES,
    Bible,
    DraftScene,
    DraftScenes,
    Scene,
    Shot,
    ShotPlan,
)
from .run import InputError
from .textsafe import clean

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

CAMERA_PHRASES = {
    "static": "static shot, locked-off camera",
    "pan-left": "slow pan to the left",
    "pan-right": "slow pan to the right",
    "tilt-up": "camera tilts up",
    "tilt-down": "camera tilts down",
    "zoom-in": "slow zoom in",
    "zoom-out": "slow zoom out",
    "dolly-in": "camera dollies in",
    "dolly-out": "camera dollies out",
    "tracking": "tracking shot following the subject",
    "orbit": "camera orbits around the subject",
    "handheld": "handheld camera, slight shake",
}
_SHOWN_OUTPUT = 1500
DEFAULT_STAGE_DEADLINE_S = 1800.0


class PlanningError(LLMError):
    """The LLM did not produce a usable plan within the allowed tries."""


@dataclass
class Attempts:
    """How one structured request went: for logs, the manifest and the benchmark."""

    what: str
    tries: int = 0
    errors: list[list[str]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    mode: str = ""

    @property
    def valid_first_try(self) -> bool:
        return self.tries == 1


def _errors_of(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        out.append(f"{where}: {e['msg']}")
    return out


class Planner:
    def __init__(
        self,
        llm: LLMBackend,
        *,
        max_tries: int = 3,
        temperature: float = 0.7,
        on_token: Callable[[str], None] | None = None,
        stage_deadline_s: float | None = None,
    ) -> None:
        self.llm = llm
        self.max_tries = max_tries
        self.temperature = temperature
        self.on_token = on_token
        self.attempts: list[Attempts] = []
        # Story, bible and scenes each get this long, repairs included; by default what
        # the backend was configured with (llm.stage_deadline_s).
        self.stage_deadline_s = float(
            stage_deadline_s if stage_deadline_s is not None
            else getattr(llm, "stage_deadline_s", DEFAULT_STAGE_DEADLINE_S))

    def _time_left(self, what: str, started: float, tries: int) -> float:
        left = started + self.stage_deadline_s - time.monotonic()
        if left <= 0:
            raise PlanningError(f"{what}: no valid reply within the stage deadline of "
                                f"{self.stage_deadline_s:.0f}s (llm.stage_deadline_s) after "
                                f"{tries} tr{'y' if tries == 1 else 'ies'}")
        return left

    def _messages(self, user: str) -> list[Message]:
        return [{"role": "system", "content": prompts.render("system")},
                {"role": "user", "content": user}]

    # -- story -----------------------------------------------------------------------------
    def write_story(self, idea: str, style: str, scenes: int) -> str:
        words = 60 * scenes
        user = prompts.render("story", idea=idea, style=style, scenes=scenes, words=words)
        started = time.monotonic()
        for n in range(2):
            done = self.llm.complete(
                self._messages(user), max_tokens=int(words * 2.5) + 64,
                temperature=self.temperature, on_token=self.on_token,
                deadline_s=self._time_left("story", started, n),
            )
            log.info("story: %d tokens in %.1fs (%.0f tok/s)",
                     done.completion_tokens, done.seconds, done.tokens_per_s)
            self.attempts.append(Attempts("story", 1, [], done.completion_tokens, done.seconds))
            story = clean(done.text).strip()
            if len(story) >= 20:
                return story
            log.warning("story reply too short (%d chars); asking again", len(story))
        raise PlanningError(f"the LLM returned no usable story for idea {idea!r}")

    # -- structured requests with repair ---------------------------------------------------
    def structured(
        self,
        what: str,
        user: str,
        model: type[M],
        schema: dict[str, Any],
        check: Callable[[M], list[str]] | None = None,
        max_tokens: int = 1500,
    ) -> M:
        """Ask for JSON, validate it, and feed exact errors back until it passes."""
        messages = self._messages(user)
        record = Attempts(what)
        self.attempts.append(record)
        last_text = ""
        errors: list[str] = []
        started = time.monotonic()
        for attempt in range(1, self.max_tries + 1):
            left = self._time_left(what, started, attempt - 1)
            record.tries = attempt
            reply = self.llm.complete_json(
                messages, schema, max_tokens=max_tokens, temperature=self.temperature,
                deadline_s=left,
            )
            record.tokens += reply.completion_tokens
            record.seconds += reply.seconds
            record.mode = reply.mode
            last_text = reply.text
            errors = self._validate(reply.text, model, check)
            if not errors:
                log.info("%s: valid after %d tr%s (%s)", what, attempt,
                         "y" if attempt == 1 else "ies", reply.mode)
                return model.model_validate(extract_json_object(reply.text))
            record.errors.append(errors)
            log.warning("%s: try %d/%d invalid: %s", what, attempt, self.max_tries,
                        "; ".join(errors[:5]))
            messages = [
                *messages,
                {"role": "assistant", "content": reply.text[:4000]},
                {"role": "user", "content": prompts.render("repair", errors=errors[:12])},
            ]
        shown = last_text[:_SHOWN_OUTPUT] + ("..." if len(last_text) > _SHOWN_OUTPUT else "")
        raise PlanningError(
            f"{what}: no valid reply after {self.max_tries} tries. Last errors: "
            f"{'; '.join(errors[:8])}. Last output: {shown!r}"
        )

    @staticmethod
    def _validate(
        text: str, model: type[M], check: Callable[[M], list[str]] | None
    ) -> list[str]:
        try:
            data = extract_json_object(text)
        except JSONExtractError as err:
            return [f"not valid JSON: {err}"]
        try:
            obj = model.model_validate(data)
        except ValidationError as err:
            return _errors_of(err)
        return check(obj) if check else []

    # -- bible and scenes ------------------------------------------------------------------
    def make_bible(self, story: str, style: str) -> Bible:
        bible = self.structured(
            "bible", prompts.render("bible", story=story, style=style),
            Bible, Bible.model_json_schema(), max_tokens=700,
        )
        # Character images are the user's to give (plan JSON, batch entry), never the LLM's.
        return bible.model_copy(update={"characters": [
            c.model_copy(update={"image": None}) for c in bible.characters]})

    def make_scenes(
        self, story: str, bible: Bible, scenes: int, min_shots: int, max_shots: int
    ) -> DraftScenes:
        names = [c.name for c in bible.characters]
        schema = scenes_schema(scenes, min_shots, max_shots, names)

        def check(d: DraftScenes) -> list[str]:
            errs = []
            if len(d.scenes) != scenes:
                errs.append(f"scenes: need exactly {scenes} scenes, got {len(d.scenes)}")
            for i, sc in enumerate(d.scenes):
                if not min_shots <= len(sc.shots) <= max_shots:
                    errs.append(f"scenes.{i}.shots: need {min_shots} to {max_shots} shots, "
                                f"got {len(sc.shots)}")
                for j, sh in enumerate(sc.shots):
                    errs += [f"scenes.{i}.shots.{j}.characters: {n!r} is not one of {names}"
                             for n in sh.characters if bible.character(n) is None]
            return errs

        user = prompts.render("scenes", story=story, bible=bible, scenes=scenes,
                              min_shots=min_shots, max_shots=max_shots, cameras=CAMERA_MOVES)
        return self.structured("scenes", user, DraftScenes, schema, check,
                               max_tokens=400 + 250 * scenes * max_shots)


def scenes_schema(scenes: int, min_shots: int, max_shots: int, names: list[str]) -> dict[str, Any]:
    """JSON schema with the counts and character names fixed, so a grammar can enforce them."""
    shot = {
        "type": "object",
        "properties": {
            "action": {"type": "string", "minLength": 8, "maxLength": 400},
            "camera": {"type": "string", "enum": list(CAMERA_MOVES)},
            "characters": {"type": "array", "items": {"type": "string", "enum": names},
                           "maxItems": 4},
        },
        "required": ["action", "camera", "characters"],
    }
    scene = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 2, "maxLength": 80},
            "setting": {"type": "string", "minLength": 3, "maxLength": 300},
            "shots": {"type": "array", "items": shot, "minItems": min_shots,
                      "maxItems": max_shots},
        },
        "required": ["title", "setting", "shots"],
    }
    return {
        "type": "object",
        "properties": {"scenes": {"type": "array", "items": scene, "minItems": scenes,
                                  "maxItems": scenes}},
        "required": ["scenes"],
    }


# -- technical fields ----------------------------------------------------------------------
def snap_frames(frames: float) -> int:
    """Nearest 4k+1 within the engine's range."""
    k = round((frames - 1) / 4)
    return max(MIN_FRAMES, min(MAX_FRAMES, 4 * k + 1))


def allocate_frames(n_shots: int, target_seconds: float, fps: int) -> list[int]:
    """Split the target into 4k+1 clips whose total stays as close as possible to it."""
    total = target_seconds * fps
    out: list[int] = []
    done = 0.0
    for i in range(n_shots):
        ideal_end = total * (i + 1) / n_shots
        f = snap_frames(ideal_end - done)
        out.append(f)
        done += f
    return out


def min_shots_per_scene(target_seconds: float, fps: int, scenes: int) -> int:
    return max(1, math.ceil(target_seconds * fps / MAX_FRAMES / scenes))


def check_target_reachable(scenes: int, target_seconds: float, video: VideoSettings) -> None:
    """Refuse, before any LLM call, a target that no plan within the limits can reach."""
    most = scenes * video.max_shots_per_scene * MAX_FRAMES / video.fps
    if target_seconds - most > DURATION_TOLERANCE * target_seconds + 1.0:
        raise InputError(
            f"target_seconds {target_seconds:g} cannot be reached: {scenes} scene(s) x at most "
            f"{video.max_shots_per_scene} shots (video.max_shots_per_scene) x {MAX_FRAMES} "
            f"frames at {video.fps} fps = {most:.1f}s. Use more scenes or shots per scene, a "
            "lower fps, or a shorter target")


def base_seed(idea: str, seed: int | None) -> int:
    if seed is not None:
        return seed
    return int(hashlib.sha256(idea.encode()).hexdigest()[:8], 16)


def character_names(bible: Bible, named: list[str]) -> list[str]:
    """The bible's names of the characters a shot names, each once: small models list one
    character several times, and its description must not repeat in the prompt."""
    found = [c.name for n in named if (c := bible.character(n)) is not None]
    return list(dict.fromkeys(found))


def compose_prompt(action: str, scene: DraftScene, bible: Bible, names: list[str],
                   camera: str) -> str:
    chars = [c for n in character_names(bible, names) if (c := bible.character(n)) is not None]
    text = prompts.render(
        "shot_prompt", shot={"action": action}, characters=chars, scene=scene,
        bible=bible, camera_phrase=CAMERA_PHRASES[camera],
    )
    return " ".join(text.split())


def build_plan(
    *,
    idea: str,
    story: str,
    style: str,
    target_seconds: float,
    bible: Bible,
    draft: DraftScenes,
    video: VideoSettings,
) -> ShotPlan:
    n_shots = sum(len(s.shots) for s in draft.scenes)
    frames = iter(allocate_frames(n_shots, target_seconds, video.fps))
    seed0 = base_seed(idea, video.seed)
    negative = prompts.render("negative", extra="")
    scenes: list[Scene] = []
    for i, dsc in enumerate(draft.scenes):
        shots = []
        for j, dsh in enumerate(dsc.shots):
            names = character_names(bible, dsh.characters)
            shots.append(Shot(
                id=f"s{i + 1:02d}_sh{j + 1:02d}", scene_index=i, shot_index=j,
                action=dsh.action,
                prompt=compose_prompt(dsh.action, dsc, bible, names, dsh.camera),
                negative_prompt=negative, frames=next(frames), fps=video.fps,
                width=video.width, height=video.height,
                seed=(seed0 + 1000 * i + j) % 2**32, camera=dsh.camera, characters=names,
                continuity_hint=f"same look as scene {i + 1} shot {j}" if j else None,
            ))
        scenes.append(Scene(index=i, title=dsc.title, setting=dsc.setting, shots=shots))
    return ShotPlan(
        idea=idea, story=story, style=style, target_seconds=target_seconds,
        prompt_version=prompts.prompt_version(), bible=bible, scenes=scenes,
    )


def plan_from_story(
    planner: Planner, *, idea: str, story: str, style: str, scenes: int,
    target_seconds: float, video: VideoSettings,
) -> ShotPlan:
    check_target_reachable(scenes, target_seconds, video)
    bible = planner.make_bible(story, style)
    min_shots = min(min_shots_per_scene(target_seconds, video.fps, scenes),
                    video.max_shots_per_scene)
    draft = planner.make_scenes(story, bible, scenes, min_shots, video.max_shots_per_scene)
    return build_plan(idea=idea, story=story, style=style, target_seconds=target_seconds,
                      bible=bible, draft=draft, video=video)
