from __future__ import annotations

import json

import pytest

from story_to_video.config import VideoSettings
from story_to_video.planner import (
    Planner,
    PlanningError,
    allocate_frames,
    min_shots_per_scene,
    plan_from_story,
    snap_frames,
)
from tests.fakes import ScriptedLLM, bible_json, scenes_json

VIDEO = VideoSettings()


def plan_with(replies: list[str], scenes: int = 2, target: float = 10.0, **kw: object):
    llm = ScriptedLLM(replies)
    planner = Planner(llm, max_tries=3)
    plan = plan_from_story(planner, idea="a keeper and a whale", story="story text",
                           style="cinematic", scenes=scenes, target_seconds=target,
                           video=VideoSettings(**kw))  # type: ignore[arg-type]
    return plan, llm, planner


def test_valid_first_try_builds_wan_ready_plan() -> None:
    plan, llm, planner = plan_with([bible_json(), scenes_json(2, 2)])
    assert [s.id for s in plan.shots] == ["s01_sh01", "s01_sh02", "s02_sh01", "s02_sh02"]
    assert all((s.frames - 1) % 4 == 0 for s in plan.shots)
    assert abs(plan.duration_s - 10.0) <= 0.5
    assert [a.tries for a in planner.attempts] == [1, 1]
    # the bible is carried verbatim into every shot prompt
    for shot in plan.shots:
        assert "Mara: Mara look, tall, wearing grey coat" in shot.prompt
        assert "cinematic, 35mm film" in shot.prompt
        assert "teal and amber, low sun" in shot.prompt
        assert "slow pan to the left" in shot.prompt
        assert "watermark" in shot.negative_prompt
    # the counts and names went into the schema, where a grammar enforces them
    sc = llm.schemas[1]["properties"]["scenes"]
    assert (sc["minItems"], sc["maxItems"]) == (2, 2)
    assert sc["items"]["properties"]["shots"]["minItems"] == 1
    names = sc["items"]["properties"]["shots"]["items"]["properties"]["characters"]
    assert names["items"]["enum"] == ["Mara", "Whale"]


def test_empty_shot_list_is_repaired_with_exact_errors() -> None:
    empty = json.dumps({"scenes": [{"title": "A", "setting": "pier at dusk", "shots": []},
                                   {"title": "B", "setting": "pier at dusk", "shots": []}]})
    plan, llm, planner = plan_with([bible_json(), empty, scenes_json(2, 1)])
    assert len(plan.shots) == 2
    assert planner.attempts[1].tries == 2
    repair = llm.sent[2][-1]["content"]
    assert "scenes.0.shots: List should have at least 1 item" in repair
    assert "scenes.1.shots" in repair
    assert llm.sent[2][-2] == {"role": "assistant", "content": empty}


@pytest.mark.parametrize("bad", [
    '{"scenes": [{"title": "A", "setting": "pier", "shots": [{"action": "walks',  # truncated
    '{"scenes": "none"}',  # wrong type
    "Here you go!\n" + scenes_json(1, 1),  # wrong count, inside prose
    scenes_json(2, 1, characters=["Bob"]),  # unknown character
    scenes_json(2, 1, camera="crane"),  # not a camera move
])
def test_each_kind_of_bad_output_is_repaired(bad: str) -> None:
    plan, _, planner = plan_with([bible_json(), bad, scenes_json(2, 1)])
    assert planner.attempts[1].tries == 2
    assert planner.attempts[1].errors[0]  # the exact errors were recorded
    assert len(plan.scenes) == 2


def test_gives_up_after_max_tries_showing_last_output() -> None:
    bad = '{"scenes": [{"title": "A"}]}'
    with pytest.raises(PlanningError) as exc:
        plan_with([bible_json(), bad, bad, bad])
    msg = str(exc.value)
    assert msg.startswith("scenes: no valid reply after 3 tries")
    assert "scenes.0.setting: Field required" in msg
    assert "Last output: '{\"scenes\": [{\"title\": \"A\"}]}'" in msg


def test_huge_reply_fails_with_size_in_message() -> None:
    huge = "{" + "x" * (10 * 2**20)
    with pytest.raises(PlanningError, match="more than the 200,000"):
        plan_with([huge, huge, huge])


def test_special_text_reaches_the_plan_byte_exact() -> None:
    action = 'Mara says "{hello}" \\ to the whale \u00e9\u6f22\U0001f40b ../../etc/passwd'
    plan, _, _ = plan_with([bible_json(), scenes_json(2, 1, action=action)])
    shot = plan.shots[0]
    assert shot.action == action
    assert action in shot.prompt
    again = type(plan).model_validate_json(plan.model_dump_json())
    assert again.shots[0].prompt == shot.prompt
    assert shot.id == "s01_sh01"  # ids come from code, never from LLM text


def test_story_retry_then_failure() -> None:
    llm = ScriptedLLM([], story="   ")
    with pytest.raises(PlanningError, match="no usable story"):
        Planner(llm).write_story("idea", "noir", 2)
    assert len(llm.sent) == 2


@pytest.mark.parametrize(("n", "seconds", "fps"), [(1, 5, 16), (3, 12, 16), (7, 30, 24),
                                                    (4, 2, 16)])
def test_frames_snap_and_sum_close_to_target(n: int, seconds: float, fps: int) -> None:
    frames = allocate_frames(n, seconds, fps)
    assert len(frames) == n
    assert all((f - 1) % 4 == 0 and 5 <= f <= 241 for f in frames)
    target = max(seconds * fps, 5 * n)
    assert abs(sum(frames) - target) <= 4 * n / 2 + 2


def test_long_targets_ask_for_more_shots() -> None:
    assert snap_frames(1000) == 241
    assert min_shots_per_scene(60, 16, 2) == 2  # 480 frames per scene > 241
    plan, llm, _ = plan_with([bible_json(), scenes_json(2, 2)], target=60.0)
    assert llm.schemas[1]["properties"]["scenes"]["items"]["properties"]["shots"][
        "minItems"] == 2
    assert abs(plan.duration_s - 60) < 1


def test_seed_is_stable_and_configurable() -> None:
    a, _, _ = plan_with([bible_json(), scenes_json(2, 1)])
    b, _, _ = plan_with([bible_json(), scenes_json(2, 1)])
    c, _, _ = plan_with([bible_json(), scenes_json(2, 1)], seed=7)
    assert [s.seed for s in a.shots] == [s.seed for s in b.shots]
    assert [s.seed for s in c.shots] == [7, 1007]
