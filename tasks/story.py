"""Stage 1: the story, from the configured LLM, streamed with progress in the logs."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from story_to_video.atomic import write_text_atomic
from story_to_video.llm.base import LLMBackend
from story_to_video.planner import Planner
from story_to_video.run import RunFolder


class _Progress:
    """Logs every ~64 streamed tokens so a slow local model visibly makes progress."""

    def __init__(self) -> None:
        self.tokens = 0
        self.log = get_run_logger()

    def __call__(self, _piece: str) -> None:
        self.tokens += 1
        if self.tokens % 64 == 0:
            self.log.info("story: %d tokens so far", self.tokens)


@task(name="write-story", cache_policy=NO_CACHE)
def write_story(llm: LLMBackend, folder: RunFolder, temperature: float = 0.7) -> str:
    log = get_run_logger()
    saved = folder.load_story()  # an unusable saved story is set aside and asked again
    if saved is not None:
        log.info("story: reusing %s", folder.story_path)
        return saved
    spec = folder.spec
    planner = Planner(llm, temperature=temperature, on_token=_Progress())
    story = planner.write_story(spec.idea, spec.style, spec.scenes)
    write_text_atomic(folder.story_path, story + "\n")
    log.info("story: %d words from %s", len(story.split()), llm.description)
    return story
