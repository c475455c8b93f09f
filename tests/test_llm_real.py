"""Against the real embedded llama.cpp server (SmolLM2-135M), over HTTP via `openai`."""

from __future__ import annotations

import pytest

from story_to_video.config import VideoSettings
from story_to_video.llm import LLMModelNotFound, LLMUnavailable, OpenAICompatibleBackend
from story_to_video.llm.embedded import MODEL_ALIAS, free_port
from story_to_video.planner import Planner, plan_from_story

pytestmark = pytest.mark.slow


def backend(url: str, **kw: object) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(url, **kw)  # type: ignore[arg-type]


def test_dead_server_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMUnavailable, match=f"cannot reach the LLM server at {url}"):
        backend(url, backend="lmstudio", connect_retries=0).model()


def test_wrong_model_lists_what_the_server_offers(embedded_llm_url: str) -> None:
    with pytest.raises(LLMModelNotFound) as exc:
        backend(embedded_llm_url, model="qwen-72b").model()
    assert str(exc.value) == (f"model 'qwen-72b' is not offered by {embedded_llm_url}; "
                              f"available: {MODEL_ALIAS}")


def test_falls_back_from_json_schema_to_what_llamacpp_accepts(embedded_llm_url: str) -> None:
    # llama-cpp-python's server answers `json_schema` with HTTP 500; the backend must
    # notice, fall back to `json_object` + schema, and remember it.
    llm = backend(embedded_llm_url, backend="openai-compatible", connect_retries=0)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    msgs = [{"role": "user", "content": "Give a number as JSON."}]
    reply = llm.complete_json(msgs, schema, max_tokens=20, temperature=0)
    assert reply.mode == "json_object_schema"
    assert llm.structured_mode == "json_object_schema"
    assert isinstance(__import__("json").loads(reply.text)["n"], int)


def test_streaming_story_reports_tokens(embedded_llm_url: str) -> None:
    pieces: list[str] = []
    llm = backend(embedded_llm_url, backend="llamacpp-embedded")
    story = Planner(llm, on_token=pieces.append).write_story("a fox finds a lantern",
                                                             "fairy tale", 2)
    assert len(story.split()) > 20
    assert "".join(pieces).strip() == story
    assert len(pieces) > 20


def test_real_model_plans_validate(embedded_llm_url: str) -> None:
    llm = backend(embedded_llm_url, backend="llamacpp-embedded")
    planner = Planner(llm, max_tries=3)
    story = planner.write_story("a robot waters a garden on Mars", "pixar", 2)
    plan = plan_from_story(planner, idea="a robot waters a garden on Mars", story=story,
                           style="pixar", scenes=2, target_seconds=8,
                           video=VideoSettings())
    assert len(plan.scenes) == 2
    assert all(scene.shots for scene in plan.scenes)
    assert abs(plan.duration_s - 8) < 1.7
    assert all((s.frames - 1) % 4 == 0 for s in plan.shots)
