"""Stage 3: one clip per shot from the video engine; finished shots are never redone."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from story_to_video.atomic import write_json_atomic
from story_to_video.engines.base import Progress, VideoEngine
from story_to_video.models import Shot
from story_to_video.run import RunFolder


@task(name="render-shot", task_run_name="render-{shot.id}", cache_policy=NO_CACHE)
def render_shot(engine: VideoEngine, shot: Shot, folder: RunFolder) -> dict[str, Any]:
    log = get_run_logger()
    key = folder.shot_key(shot, engine.fingerprint())
    done = folder.finished_record(shot, key)
    if done is not None:
        log.info("%s: already finished (%s), not redone", shot.id, done["clip"])
        return {**done, "resumed": True}

    def progress(p: Progress) -> None:
        log.info("%s: step %d/%d %s", p.shot_id, p.step, p.total, p.node)

    out = folder.clip_path(shot, key)
    started = time.time()
    result = engine.render(shot, out, progress)
    record = {
        "shot_id": shot.id, "key": key, "clip": out.name, "frames": result.frames,
        "fps": result.fps, "width": result.width, "height": result.height,
        "seconds": round(result.seconds, 3), "engine": result.engine,
        "preview": result.preview, "cached": result.cached, "started_at": started,
        "details": result.details,
    }
    write_json_atomic(folder.record_path(shot, key), record)
    label = "PREVIEW clip" if result.preview else "clip"
    log.info("%s: %s %s in %.1fs%s", shot.id, label, out.name, result.seconds,
             " (from engine cache)" if result.cached else "")
    return {**record, "resumed": False}
