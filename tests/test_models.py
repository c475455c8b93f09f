from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from story_to_video.models import Bible, DraftShot, Shot, ShotPlan


def shot(**kw: Any) -> Shot:
    base: dict[str, Any] = {"id": "s01_sh01", "scene_index": 0, "shot_index": 0, "action": "a",
                            "prompt": "p", "frames": 81, "fps": 16, "width": 832,
                            "height": 480, "seed": 1}
    base.update(kw)
    return Shot(**base)


@pytest.mark.parametrize("frames", [33, 49, 81, 121, 161])
def test_wan_frame_counts_pass(frames: int) -> None:
    assert shot(frames=frames).duration_s == frames / 16


@pytest.mark.parametrize(("field", "value", "msg"), [
    ("frames", 80, r"4k\+1 .*nearest 81"),
    ("frames", 1, "greater than or equal to 5"),
    ("width", 840, "multiple of 16"),
    ("height", 112, "greater than or equal to 128"),
    ("fps", 120, "less than or equal to 60"),
    ("id", "../etc", "should match pattern"),
])
def test_wan_rules(field: str, value: Any, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        shot(**{field: value})


def test_camera_synonyms_normalised() -> None:
    assert DraftShot(action="she runs home fast", camera="Zoom In").camera == "zoom-in"
    with pytest.raises(ValidationError, match="camera"):
        DraftShot(action="she runs home fast", camera="crane")


def _plan(**kw: Any) -> ShotPlan:
    bible = Bible(style="noir", palette="grey", characters=[
        {"name": "Ana", "look": "short hair", "wardrobe": "coat"}])
    base: dict[str, Any] = {
        "idea": "i", "story": "s", "style": "noir", "target_seconds": 10.0,
        "prompt_version": "v", "bible": bible,
        "scenes": [{"index": 0, "title": "t", "setting": "x",
                    "shots": [shot(frames=81), shot(id="s01_sh02", frames=81)]}],
    }
    base.update(kw)
    return ShotPlan(**base)


def test_plan_duration_near_target() -> None:
    assert _plan().duration_s == pytest.approx(10.125)
    with pytest.raises(ValidationError, match="not near the target 30.0s"):
        _plan(target_seconds=30.0)


def test_plan_refuses_unknown_character_and_duplicate_ids() -> None:
    with pytest.raises(ValidationError, match="character 'Bob' not in the bible"):
        _plan(scenes=[{"index": 0, "title": "t", "setting": "x",
                       "shots": [shot(frames=161, characters=["Bob"])]}])
    with pytest.raises(ValidationError, match="unique"):
        _plan(scenes=[{"index": 0, "title": "t", "setting": "x",
                       "shots": [shot(), shot()]}])


def test_bible_drops_repeated_characters() -> None:
    b = Bible(style="noir", palette="grey", characters=[
        {"name": "Ana", "look": "short hair", "wardrobe": "coat"},
        {"name": " ana ", "look": "long hair", "wardrobe": "hat"},
        {"name": "Bo", "look": "tall man", "wardrobe": "suit"}])
    assert [(c.name, c.look) for c in b.characters] == [("Ana", "short hair"),
                                                        ("Bo", "tall man")]
