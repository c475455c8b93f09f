"""Stage 2: the validated shot plan (bible, scenes, shots), repaired until it passes."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from story_to_video.config import LLMSettings, VideoSettings
from story_to_video.llm.base import LLMBackend
from story_to_video.models import ShotPlan
from story_to_video.planner import Planner, plan_from_story
from story_to_video.run import RunFolder


@task(name="plan-shots", cache_policy=NO_CACHE)
def plan_shots(
    llm: LLMBackend, folder: RunFolder, story: str, llm_cfg: LLMSettings, video: VideoSettings
) -> ShotPlan:
    log = get_run_logger()
    existing = folder.load_plan()
    if existing is not None:
        log.info("plan: reusing %s (%d shots)", folder.plan_path, len(existing.shots))
        return existing
    spec = folder.spec
    planner = Planner(llm, max_tries=llm_cfg.max_repair_tries, temperature=llm_cfg.temperature)
    plan = plan_from_story(planner, idea=spec.idea, story=story, style=spec.style,
                           scenes=spec.scenes, target_seconds=spec.target_seconds, video=video)
    for a in planner.attempts:
        log.info("plan: %s took %d tr%s, %d tokens, %.1fs, mode %s", a.what, a.tries,
                 "y" if a.tries == 1 else "ies", a.tokens, a.seconds, a.mode or "text")
    folder.save_plan(plan)
    log.info("plan: %d scenes, %d shots, %.1fs of video (target %.1fs), prompts %s",
             len(plan.scenes), len(plan.shots), plan.duration_s, spec.target_seconds,
             plan.prompt_version)
    return plan
