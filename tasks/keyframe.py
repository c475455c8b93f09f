"""Stage 2b: keyframes, before any clip. Every keyframe a run needs is rendered first, so
the keyframe model loads once and the video models once (the broker plans the order and
whether the keyframe model is unloaded before the clips). A finished keyframe is never
redone; keyframes are claimed like shots, so several workers can share them."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from resource_broker.broker import Broker
from story_to_video.locks import claim, release
from story_to_video.models import Shot
from story_to_video.start_images import StartImages


def _broker_plan(engine: Any, broker: Broker | None, shots: list[Shot], clips: int) -> bool:
    """The broker's keyframe decision; True when the keyframe model goes before the clips."""
    bound = getattr(engine, "keyframe", None)
    if broker is None or bound is None:
        return False
    kf_files, video_files = engine.keyframe_models()
    first = shots[0]
    d = broker.plan_keyframes(bound.binding.model, first.frames, first.width, first.height,
                              keyframes=len(shots), clips=clips,
                              shared_models=bool(kf_files) and kf_files <= video_files,
                              other_gib=bound.binding.vram_gib)
    return bool(d.params.get("unload_after"))


@task(name="keyframes", task_run_name="keyframes-{label}", cache_policy=NO_CACHE)
def render_keyframes(engine: Any, starts: StartImages, broker: Broker | None = None,
                     label: str = "run", last: bool = True) -> int:
    """Render the run's missing keyframes; returns how many were rendered now. `last`:
    no other run's keyframes follow (a night renders every idea's keyframes in a row and
    unloads the keyframe model, if the broker says so, only after the last)."""
    log = get_run_logger()
    shots = starts.keyframe_shots()
    todo = [s for s in shots if not starts.keyframe_done(s)]
    if not shots:
        return 0
    unload = _broker_plan(engine, broker, shots, len(starts.plan.shots))
    if not todo:
        log.info("keyframes: all %d finished already, none redone", len(shots))
        return 0
    made = 0
    for shot in todo:
        lock = starts.keyframe_path(shot).with_suffix(".claim")
        while not claim(lock):  # another worker renders it: wait for it
            time.sleep(1.0)
        try:
            if starts.keyframe_done(shot):
                continue
            t0 = time.monotonic()
            record = starts.render_keyframe(shot)
            made += 1
            log.info("%s: keyframe %s in %.1fs", shot.id, record["image"],
                     time.monotonic() - t0)
        finally:
            release(lock)
    engine.after_keyframes(unload and last)
    return made
