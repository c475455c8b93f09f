"""Stage 3: one clip per shot from the video engine; finished shots are never redone.

Several workers may share a run: a shot is claimed before it is rendered, so no shot is
rendered twice; a claim left by a killed worker is taken over.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from resource_broker.broker import Broker
from story_to_video.atomic import write_json_atomic
from story_to_video.engines.base import ClipResult, PassMajorEngine, Progress, VideoEngine
from story_to_video.engines.comfyui.errors import (
    ComfyUIDied,
    ComfyUIUnavailable,
    Interrupted,
    StallError,
)
from story_to_video.locks import claim, is_stale, release
from story_to_video.models import Shot
from story_to_video.run import InputError, RunFolder
from story_to_video.worker import made_by

TRANSIENT = (ComfyUIUnavailable, ComfyUIDied, StallError, Interrupted, ConnectionError)
DISK_MARGIN_BYTES = 200 * 2**20


class DiskFull(InputError):
    """Not enough free disk for the next clip: the batch stops cleanly, keeping what is done."""


def _transient(_task: Task[Any, Any], _run: TaskRun, state: State[Any]) -> bool:
    """Retry server restarts and dropped sockets; never validation errors or OOM (the broker
    already retried those with a leaner plan)."""
    try:
        state.result(raise_on_failure=True)
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False


def check_disk(folder: RunFolder, shot: Shot) -> None:
    # H.264 preview/Wan clips stay well under 0.3 bytes per pixel-frame.
    need = int(shot.frames * shot.width * shot.height * 0.3) + DISK_MARGIN_BYTES
    free = shutil.disk_usage(folder.root).free
    if free < need:
        raise DiskFull(f"only {free / 2**20:.0f} MiB free in {folder.root}; shot {shot.id} "
                       f"needs about {need / 2**20:.0f} MiB. Finished shots are kept; free "
                       "space and re-run to resume.")


def terminal_bar(p: Progress) -> None:
    """A progress bar on an interactive terminal during long sampling waits."""
    if not sys.stderr.isatty() or p.total <= 0:
        return
    filled = int(30 * p.step / p.total)
    sys.stderr.write(f"\r{p.shot_id} [{'#' * filled}{'.' * (30 - filled)}] "
                     f"{p.step}/{p.total} {p.node:<12}")
    if p.step >= p.total:
        sys.stderr.write("\n")
    sys.stderr.flush()


# One delay, not a list: the Prefect UI shows a list as "Retry Delay: NaNs". 20 s covers a
# ComfyUI restart; the engine itself already reconnects within a shot.
@task(name="render-shot", task_run_name="render-{shot.id}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=20, retry_condition_fn=_transient)
def render_shot(engine: VideoEngine, shot: Shot, folder: RunFolder,
                wait_for_others: bool = True) -> dict[str, Any] | None:
    """The shot's record; None when another worker holds it and we are not to wait."""
    log = get_run_logger()
    key = folder.shot_key(shot, engine.fingerprint())
    done = folder.finished_record(shot, key)
    if done is not None:
        log.info("%s: already finished (%s), not redone", shot.id, done["clip"])
        return {**done, "resumed": True}
    lock = folder.clip_path(shot, key).with_suffix(".claim")
    while not claim(lock):
        if not wait_for_others:
            log.info("%s: being rendered by another worker; moving on", shot.id)
            return None
        time.sleep(1.0)
        done = folder.finished_record(shot, key)
        if done is not None:
            log.info("%s: finished by another worker (%s)", shot.id, done["clip"])
            return {**done, "resumed": True}
    try:
        return _render(engine, shot, folder, key)
    finally:
        release(lock)


def save_record(folder: RunFolder, shot: Shot, key: str, result: ClipResult,
                started: float) -> dict[str, Any]:
    """The finished shot's record, written atomically beside its clip."""
    record = {
        "shot_id": shot.id, "key": key, "clip": result.path.name, "frames": result.frames,
        "fps": result.fps, "width": result.width, "height": result.height,
        "seconds": round(result.seconds, 3), "engine": result.engine,
        "preview": result.preview, "cached": result.cached, "started_at": started,
        "start_image": _relative(folder, shot.start_image), "details": result.details,
        "made_by": made_by(),
    }
    write_json_atomic(folder.record_path(shot, key), record)
    return record


def _relative(folder: RunFolder, path: str | None) -> str | None:
    """A start image as the report links it: relative to the run folder."""
    if not path:
        return None
    p = Path(path)
    return str(p.relative_to(folder.root)) if p.is_relative_to(folder.root) else p.name


def _render(engine: VideoEngine, shot: Shot, folder: RunFolder, key: str) -> dict[str, Any]:
    log = get_run_logger()
    check_disk(folder, shot)

    def progress(p: Progress) -> None:
        log.info("%s: step %d/%d %s", p.shot_id, p.step, p.total, p.node)
        terminal_bar(p)

    out = folder.clip_path(shot, key)
    started = time.time()
    result = engine.render(shot, out, progress)
    record = save_record(folder, shot, key, result, started)
    label = "PREVIEW clip" if result.preview else "clip"
    log.info("%s: %s %s in %.1fs%s", shot.id, label, out.name, result.seconds,
             " (from engine cache)" if result.cached else "")
    return {**record, "resumed": False}


@task(name="render-pass-major", cache_policy=NO_CACHE)
def render_shots_pass_major(engine: VideoEngine, shots: list[Shot], folder: RunFolder
                            ) -> int:
    """Render every pending shot of one run pass by pass; returns how many."""
    return render_group_pass_major.fn(engine, [(s, folder) for s in shots])


def taken(engine: VideoEngine, shot: Shot, folder: RunFolder) -> bool:
    """The shot is rendered, or a live worker holds it."""
    key = folder.shot_key(shot, engine.fingerprint())
    lock = folder.clip_path(shot, key).with_suffix(".claim")
    return folder.finished_record(shot, key) is not None or \
        (lock.exists() and not is_stale(lock))


@task(name="render-group-pass-major", cache_policy=NO_CACHE)
def render_group_pass_major(engine: VideoEngine, items: list[tuple[Shot, RunFolder]]) -> int:
    """Render pending shots, of one run or of several, pass by pass (the engine must support
    it); returns how many. Shots another worker holds are left to it."""
    log = get_run_logger()
    if not isinstance(engine, PassMajorEngine) or not engine.can_pass_major():
        log.warning("pass-major batching needs the ComfyUI engine with a two-expert workflow;"
                    " rendering clip by clip")
        return 0
    refusal = engine.pass_major_refusal(len(items))
    if refusal:
        log.warning("pass-major batching skipped: %s; rendering clip by clip", refusal)
        return 0
    keys = [f.shot_key(s, engine.fingerprint()) for s, f in items]
    pending = [(s, f, k) for (s, f), k in zip(items, keys, strict=True)
               if f.finished_record(s, k) is None]
    locks = [f.clip_path(s, k).with_suffix(".claim") for s, f, k in pending]
    mine = [(p, lock) for p, lock in zip(pending, locks, strict=True) if claim(lock)]
    try:
        if not mine:
            return 0
        for (s, f, _k), _lock in mine:
            check_disk(f, s)
        log.info("pass-major batch of %d shots: each expert loads once", len(mine))
        shots = [s for (s, _f, _k), _lock in mine]
        outs = [f.clip_path(s, k) for (s, f, k), _lock in mine]
        started = time.time()
        for ((s, f, k), _lock), result in zip(mine, engine.render_pass_major(shots, outs),
                                               strict=True):
            save_record(f, s, k, result, started)
            log.info("%s: clip %s, %.1fs of its own prompts%s", s.id, result.path.name,
                     result.seconds, " (from engine cache)" if result.cached else "")
        return len(mine)
    finally:
        for _p, lock in mine:
            release(lock)


# The broker's LLM decisions run as tasks of their own, so that every broker line is in the
# log of the task it belongs to (the shots' own decisions are in their render tasks).
@task(name="place-llm", task_run_name="place-llm", cache_policy=NO_CACHE)
def place_llm(broker: Broker, first: Shot) -> None:
    """Before the first shot: keep, offload or unload the LLM for the video work."""
    broker.place_llm_for_video(broker.plan(first.frames, first.width, first.height, first.id))


@task(name="restore-llm", task_run_name="restore-llm", cache_policy=NO_CACHE)
def restore_llm(broker: Broker) -> None:
    """After the last shot: the LLM gets its GPU share back."""
    broker.restore_llm()
