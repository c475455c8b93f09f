"""Stage 4: final.mp4 from the clips in plan order, plus the run manifest."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from story_to_video.assembly import ClipRef, assemble, srt
from story_to_video.atomic import write_json_atomic, write_text_atomic
from story_to_video.config import VideoSettings
from story_to_video.models import ShotPlan
from story_to_video.run import RunFolder


@task(name="assemble", cache_policy=NO_CACHE)
def assemble_video(
    folder: RunFolder, plan: ShotPlan, records: list[dict[str, Any]], run_info: dict[str, Any],
    video: VideoSettings | None = None,
) -> str:
    log = get_run_logger()
    video = video or VideoSettings()
    actions = {s.id: s.action for s in plan.shots}
    refs = [ClipRef(folder.clips / r["clip"], r["frames"], r["fps"], actions[r["shot_id"]])
            for r in records]
    info = assemble(refs, folder.final_path, fps=plan.shots[0].fps,
                    crossfade_s=video.crossfade_s, burn_captions=video.burn_captions,
                    output_fps=video.output_fps)
    write_text_atomic(folder.final_path.with_suffix(".srt"), srt(
        [(actions[r["shot_id"]], r["frames"], r["fps"]) for r in records]))
    manifest = {
        **run_info,
        "finished_at": time.time(),
        "final": {"file": folder.final_path.name, "frames": info.frames,
                  "seconds": info.seconds, "fps": info.fps,
                  "width": info.width, "height": info.height},
        "prompt_version": plan.prompt_version,
        "story": plan.story,
        "plan": plan.model_dump(mode="json"),
        "shots": records,
    }
    write_json_atomic(folder.manifest_path, manifest)
    log.info("final video %s: %d frames, %.2fs; manifest %s", folder.final_path, info.frames,
             info.seconds, folder.manifest_path)
    return str(folder.final_path)
