"""The `story-to-video` flow: idea -> story -> shot plan -> clips -> final.mp4."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging.handlers import APILogHandler

from flows.gpu import GpuSession, gpu_session, gpu_slot
from flows.summary import (
    VideoOutcome,
    parent_run_name,
    publish_batch_table,
    publish_run_summary,
    video_run_name,
)
from resource_broker.gpu import open_monitor
from story_to_video.batch import load_batch
from story_to_video.config import ConfigError, Settings, UISettings, load_settings
from story_to_video.engines import VideoEngine, make_engine
from story_to_video.llm import open_llm
from story_to_video.locks import claimed
from story_to_video.models import Shot, ShotPlan
from story_to_video.planner import check_target_reachable
from story_to_video.report import write_report
from story_to_video.run import RunFolder, RunSpec
from story_to_video.start_images import StartImages, for_run
from story_to_video.ui import artifact_key, run_slug
from tasks.assemble import assemble_video
from tasks.keyframe import render_keyframes
from tasks.plan import plan_shots
from tasks.render import (
    place_llm,
    render_shot,
    render_shots_pass_major,
    restore_llm,
)
from tasks.story import write_story

OUR_LOGGERS = ("story_to_video", "resource_broker")


def _send_library_logs_to_prefect() -> None:
    """Library code logs with `logging`; route it to the Prefect UI too (no env needed)."""
    for name in OUR_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO)
        if not any(isinstance(h, APILogHandler) for h in lg.handlers):
            lg.addHandler(APILogHandler())


def prepare(
    idea: str, scenes: int, target_seconds: float, style: str | None, engine: str | None,
    output_dir: str | None, config_file: str | None, llm: dict[str, Any] | None,
    run_name: str | None,
) -> tuple[Settings, RunFolder]:
    """Validate everything and create the run folder; raises before any work is done."""
    overrides: dict[str, Any] = {"style": style, "engine": engine, "output_dir": output_dir}
    overrides.update({f"llm.{k}": v for k, v in (llm or {}).items()})
    settings = load_settings(config_file, overrides)
    spec = RunSpec(idea=idea, scenes=scenes, target_seconds=target_seconds,
                   style=settings.style, engine=settings.engine,
                   output_dir=Path(settings.output_dir), run_name=run_name)
    check_target_reachable(spec.scenes, spec.target_seconds, settings.video)  # before the LLM
    if settings.engine != "preview":
        open_monitor(settings.broker.gpu_index)  # a GPU index that does not exist stops here
    folder = RunFolder(spec)
    folder.prepare()
    return settings, folder


@flow(name="video", flow_run_name=video_run_name)
def make_video(
    idea: str,
    scenes: int = 3,
    target_seconds: float = 12.0,
    style: str | None = None,
    engine: str | None = None,
    output_dir: str | None = None,
    config_file: str | None = None,
    llm: dict[str, Any] | None = None,
    run_name: str | None = None,
) -> str:
    """One idea to one final.mp4. Re-running with the same inputs resumes its run folder."""
    _send_library_logs_to_prefect()
    log = get_run_logger()
    settings, folder = prepare(idea, scenes, target_seconds, style, engine, output_dir,
                               config_file, llm, run_name)
    log.info("run folder %s; engine %s", folder.root, settings.engine)
    started = time.time()

    plan = folder.load_plan()
    llm_used = "reused plan"
    if plan is None:
        with claimed(folder.root / ".plan.claim"):  # one worker plans, others wait for it
            plan = folder.load_plan()
            if plan is None:
                with open_llm(settings.llm, folder.root) as backend:
                    llm_used = backend.description
                    story = write_story(backend, folder, settings.llm.temperature)
                    plan = plan_shots(backend, folder, story, settings.llm, settings.video)
                # Leaving the block stopped an embedded LLM: its VRAM is free for video.

    video = make_engine(settings, plan, folder.root)
    run_info = {"idea": folder.spec.idea, "scenes": folder.spec.scenes,
                "target_seconds": folder.spec.target_seconds, "style": folder.spec.style,
                "engine": settings.engine, "preview": video.is_preview, "llm": llm_used,
                "started_at": started, "start_images": settings.video.start_images}
    report = {"media_url": settings.ui.media_url, "slug": run_slug(
        folder.spec.idea, folder.spec.run_name, folder.spec.key)}
    try:
        starts = for_run(settings.video.start_images, plan, folder, video)
        # e.g. image-to-video without start images, or a user image that is missing: now
        video.check_shots(starts.check())
        with gpu_slot(settings, video), gpu_session(settings, video, folder.root) as gpu:
            records = render_all(video, plan, folder, gpu, settings.comfyui.pass_major,
                                 starts)
            plot = gpu.sampler.timeline.plot(folder.root / "vram-timeline.png",
                                             title=f"VRAM: {folder.root.name}")
    except Exception as err:
        report_unfinished(folder, plan, video, run_info, report, err)
        raise
    finally:
        video.close()

    run_info["broker_events"] = [e.to_json() for e in gpu.broker.events] if gpu.broker else []
    with claimed(folder.root / ".assemble.claim"):
        final = assemble_video(folder, plan, records, run_info, settings.video)
        write_report(folder.root, plan, records, run_info, plot, **report)
    return final


def report_unfinished(folder: RunFolder, plan: ShotPlan, video: VideoEngine,
                      run_info: dict[str, Any], report: dict[str, Any],
                      err: Exception) -> None:
    """The report of a run that stopped early: what is done, and why the rest is not."""
    try:
        fingerprint = video.fingerprint()
        starts = for_run(str(run_info.get("start_images", "none")), plan, folder, video)
        ready = [p for s in plan.shots if (p := _quiet_prepared(starts, s)) is not None]
        records = [r for s in ready
                   if (r := folder.finished_record(s, folder.shot_key(s, fingerprint)))]
        write_report(folder.root, plan, records, run_info, None,
                     failure=f"{type(err).__name__}: {err}", **report)
    except Exception as report_err:  # never hide the error that stopped the run
        get_run_logger().warning("could not write the report of the unfinished run: %s",
                                 report_err)


def _quiet_prepared(starts: StartImages, shot: Shot) -> Shot | None:
    try:
        return starts.prepared(shot)
    except Exception:  # a report of what is done never fails on a start image
        return None


def pass_major_layers(video: VideoEngine, starts: StartImages, folder: RunFolder) -> None:
    """Pass by pass, one layer of the chains at a time: the shots whose start images are
    ready, then the shots chained after them, and so on."""
    pending = list(starts.plan.shots)
    while pending:
        ready = {s.id: p for s in pending if (p := starts.prepared(s)) is not None}
        if not ready:
            return  # what is left waits on shots another worker holds: the loop does them
        render_shots_pass_major(video, list(ready.values()), folder)
        pending = [s for s in pending if s.id not in ready]


def render_all(video: VideoEngine, plan: ShotPlan, folder: RunFolder,
               gpu: GpuSession, pass_major: bool = False,
               starts: StartImages | None = None) -> list[dict[str, Any]]:
    """Every shot in plan order (a chained shot after the one it starts from), keyframes
    first, with the broker placing the LLM first and restoring after."""
    starts = starts or StartImages(plan, folder, "none", video.fingerprint)
    slug = run_slug(folder.spec.idea, folder.spec.run_name, folder.spec.key)
    progress = cast(UUID, create_progress_artifact(
        0.0, key=artifact_key("progress", slug), description=f"shots of {folder.root.name}"))
    if gpu.broker is not None:
        place_llm(gpu.broker, plan.shots[0])
    found: dict[str, dict[str, Any]] = {}
    try:
        if starts.keyframe_shots():
            render_keyframes(video, starts, gpu.broker, label=folder.root.name)
        first = plan.shots[0]
        if pass_major or (gpu.broker is not None and gpu.broker.pass_major_pays(
                len(plan.shots), first.frames, first.width, first.height)):
            pass_major_layers(video, starts, folder)  # the loop below finds them done
        # First pass skips shots another worker holds (and the shots chained after them);
        # the second waits for them.
        for wait in (False, True):
            for shot in plan.shots:
                if shot.id in found:
                    continue
                ready = starts.prepared(shot, strict=wait)
                if ready is None:
                    continue
                gpu.sampler.timeline.mark(shot.id)
                record = render_shot(video, ready, folder, wait_for_others=wait)
                if record is None:
                    continue
                found[shot.id] = record
                if not record.get("resumed"):
                    video.after_shot(shot)
                update_progress_artifact(progress, 100.0 * len(found) / len(plan.shots),
                                         description=f"{len(found)}/{len(plan.shots)} shots")
    finally:
        if gpu.broker is not None:
            restore_llm(gpu.broker)
    return [found[s.id] for s in plan.shots]


@flow(name="story-to-video", flow_run_name=parent_run_name, log_prints=True)
def story_to_video(
    idea: str = "",
    scenes: int = 3,
    target_seconds: float = 12.0,
    style: str | None = None,
    engine: str | None = None,
    output_dir: str | None = None,
    config_file: str | None = None,
    llm: dict[str, Any] | None = None,
    run_name: str | None = None,
    batch: str | None = None,
    until: str | None = None,
    fan_out: bool = False,
) -> str:
    """Turn a one-line idea (or each idea of a `batch` file) into final.mp4.

    Returns the path of final.mp4, or of the batch summary in batch mode.
    `llm` overrides LLM settings, e.g. {"backend": "lmstudio", "model": "qwen2.5-7b"}.
    `until` (batch mode, local HH:MM): schedule what fits before then, leave the rest.
    `fan_out` (batch mode, in a deployment): one shard of the night on every GPU worker of
    the pool (flows/fanout.py).
    """
    common: dict[str, Any] = {"style": style, "engine": engine, "output_dir": output_dir,
                              "config_file": config_file, "llm": llm}
    if batch:
        return run_batch(batch, scenes, target_seconds, common, until, fan_out)
    state = make_video(idea=idea, scenes=scenes, target_seconds=target_seconds,
                       run_name=run_name, return_state=True, **common)
    publish_run_summary(VideoOutcome.from_state(idea, state), _media_url(config_file))
    return str(state.result())  # raises the video run's error, if it failed


def night_outcomes(result: dict[str, Any]) -> list[VideoOutcome]:
    """The batch table's rows from the night's summary, unreadable lines first, then the
    ideas in batch-file order; the night
    renders every idea in this one run, so each row links to it and to its artifacts."""
    from prefect.runtime import flow_run

    from flows.fanout import made_by_text

    run_id = UUID(flow_run.id) if flow_run.id else None
    rows = [(r, VideoOutcome(r["idea"], "Completed", r["final"], run_id, where=r["where"],
                             slug=r.get("slug", ""),
                             made_by=made_by_text(r.get("made_by", []))))
            for r in result["done"]]
    rows += [(r, VideoOutcome(r.get("idea", ""), "Failed", None, run_id, r["reason"],
                              r["where"], r.get("slug", ""))) for r in result["failed"]]
    rows += [(r, VideoOutcome(r.get("idea", ""), "Skipped", reason=r["reason"],
                              where=r["where"])) for r in result["skipped"]]
    rows += [(r, VideoOutcome(r["idea"], "Left", None, run_id, f"{r['shots_done']} shots "
                              "done; left for the next night (--until)", r["where"],
                              r.get("slug", ""))) for r in result["left"]]
    # lines that could not be read first (as the batch file's reader reports them), then
    # the ideas in file order
    return [o for _r, o in sorted(rows, key=lambda ro: (bool(ro[1].idea),
                                                         _line_no(ro[0]["where"])))]


def _line_no(where: str) -> int:
    digits = "".join(ch for ch in where if ch.isdigit())
    return int(digits) if digits else 0


def _media_url(config_file: str | None) -> str:
    try:
        return load_settings(config_file).ui.media_url
    except ConfigError:  # the video run has already said what is wrong
        return UISettings().media_url


def run_batch(batch: str, scenes: int, target_seconds: float, common: dict[str, Any],
              until: str | None = None, fan_out: bool = False) -> str:
    """The whole batch as one night, stage by stage (flows/night.py); one failed idea never
    stops the others. With `fan_out`, the night is shared by the pool's GPU workers
    (flows/fanout.py). Returns the summary's path."""
    from flows.fanout import fan_out_night, makers
    from flows.night import NightOptions, parse_until, run_night, write_summary

    _send_library_logs_to_prefect()
    log = get_run_logger()
    out_dir = Path(common["output_dir"] or load_settings(common["config_file"]).output_dir)
    opts = NightOptions(name=Path(batch).stem, out_dir=out_dir,
                        until=parse_until(until, time.time()) if until else None)
    parsed = load_batch(batch)
    result = fan_out_night(parsed, scenes, target_seconds, common, out_dir, opts.name,
                           opts.until) if fan_out else None
    if result is None:
        result, _eta = run_night(parsed, scenes, target_seconds, common, opts)
        for row in result["done"]:  # which worker and GPU made it, as a shared night says
            row["made_by"] = makers(Path(row["final"]))
    out = write_summary(out_dir, batch, result)
    publish_batch_table(opts.name, night_outcomes(result), _media_url(common["config_file"]))
    log.info("batch %s: %d done, %d failed, %d skipped, %d left for the next night; "
             "summary %s", batch, len(result["done"]), len(result["failed"]),
             len(result["skipped"]), len(result["left"]), out)
    return str(out)
