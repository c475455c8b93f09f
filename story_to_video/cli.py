"""`story-to-video` command line. Errors print one clear line and exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from resource_broker.gpu import GpuUnavailable
from resource_broker.policy import BudgetTooSmall

from .config import ConfigError, Settings, load_settings
from .engines.base import VideoEngineError
from .llm.base import LLMError
from .run import InputError, RunSpec

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn a one-line idea into a finished video on one local GPU.")

USER_ERRORS = (ConfigError, InputError, LLMError, VideoEngineError, GpuUnavailable,
               BudgetTooSmall)

IdeaOpt = Annotated[str, typer.Option("--idea", help="the one-line idea")]
ScenesOpt = Annotated[int, typer.Option("--scenes", help="number of scenes")]
SecondsOpt = Annotated[float, typer.Option("--target-seconds", help="length of the video")]
StyleOpt = Annotated[str | None, typer.Option("--style", help="style or genre")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]
BackendOpt = Annotated[str | None, typer.Option(
    "--llm-backend", help="llamacpp-embedded | lmstudio | ollama | openai-compatible")]
UrlOpt = Annotated[str | None, typer.Option("--llm-url", help="OpenAI-compatible base URL")]
ModelOpt = Annotated[str | None, typer.Option("--llm-model", help="model name on the server")]


def _fail(err: BaseException) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _llm_overrides(backend: str | None, url: str | None, model: str | None) -> dict[str, Any]:
    return {k: v for k, v in {"backend": backend, "base_url": url, "model": model}.items()
            if v is not None}


@app.command()
def run(
    idea: IdeaOpt,
    scenes: ScenesOpt = 3,
    target_seconds: SecondsOpt = 12.0,
    style: StyleOpt = None,
    engine: Annotated[str | None, typer.Option("--engine", help="preview | comfyui")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="output folder")] = None,
    config: ConfigOpt = None,
    llm_backend: BackendOpt = None,
    llm_url: UrlOpt = None,
    llm_model: ModelOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="run folder name")] = None,
) -> None:
    """Run the whole flow locally and print the path of final.mp4 last."""
    from flows.pipeline import story_to_video

    try:
        # Fail on bad input now, before Prefect starts its temporary server.
        settings = load_settings(config, {"engine": engine, "style": style})
        RunSpec(idea=idea, scenes=scenes, target_seconds=target_seconds, style=settings.style,
                engine=settings.engine, output_dir=output or Path(settings.output_dir))
        final = story_to_video(
            idea=idea, scenes=scenes, target_seconds=target_seconds, style=style,
            engine=engine, output_dir=str(output) if output else None,
            config_file=str(config) if config else None,
            llm=_llm_overrides(llm_backend, llm_url, llm_model) or None, run_name=run_name,
        )
    except USER_ERRORS as err:
        _fail(err)
    typer.echo(final)


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="JSONL (one {\"idea\": ...} a line), TOML, YAML")],
    engine: Annotated[str | None, typer.Option("--engine", help="preview | comfyui")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="output folder")] = None,
    scenes: ScenesOpt = 3,
    target_seconds: SecondsOpt = 12.0,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the ETA of each stage and idea; touch no LLM, no GPU")] = False,
    until: Annotated[str | None, typer.Option(
        "--until", help="local HH:MM: schedule what fits, leave the rest for the next night"
    )] = None,
) -> None:
    """The batch as one night, stage by stage: every idea planned (the LLM loaded once),
    then every shot rendered, each video assembled as soon as its shots are done. A failed
    idea never stops the others. Prints the summary path."""
    import time

    from flows.night import NightDoesNotFit, NightOptions, parse_until, run_night

    from .batch import BatchFileError, load_batch

    try:
        settings = load_settings(config, {"engine": engine})
        parsed = load_batch(file)
        for problem in parsed.problems:
            typer.echo(f"warning: {file}: {problem.where}: {problem.reason} (skipped)",
                       err=True)
        if not parsed.entries:
            raise BatchFileError(f"{file} has no usable idea")
        end = parse_until(until, time.time()) if until else None
        if dry_run:
            out_dir = output or Path(settings.output_dir)
            common = {"engine": settings.engine, "output_dir": str(out_dir),
                      "config_file": str(config) if config else None}
            result, _eta = run_night(parsed, scenes, target_seconds, common, NightOptions(
                name=file.stem, out_dir=out_dir, until=end, dry_run=True))
            for line in result["eta_text"]:
                typer.echo(line)
            return
        from flows.pipeline import story_to_video

        summary = story_to_video(batch=str(file), scenes=scenes, target_seconds=target_seconds,
                                 engine=settings.engine,
                                 output_dir=str(output) if output else None,
                                 config_file=str(config) if config else None, until=until)
    except NightDoesNotFit as err:
        for line in err.eta_text:
            typer.echo(line)
        _fail(err)
    except (*USER_ERRORS, BatchFileError) as err:
        _fail(err)
    data = json.loads(Path(summary).read_text())
    typer.echo(f"done {len(data['done'])}, failed {len(data['failed'])}, "
               f"skipped {len(data['skipped'])}, left for the next night "
               f"{len(data.get('left', []))}", err=True)
    for item in data["failed"]:
        typer.echo(f"failed {item['where']} ({item['idea']}): {item['reason']}", err=True)
    for item in data.get("left", []):
        typer.echo(f"left {item['where']} ({item['idea']}): {item['shots_done']} shot(s) "
                   "done, the rest next night", err=True)
    night = data.get("night") or {}
    if night:
        typer.echo(f"predicted {night['predicted_s']['total']:.0f}s, took "
                   f"{night['measured_s']['total']:.0f}s (ETA error "
                   f"{100 * night['eta_error']:+.0f}%)", err=True)
    typer.echo(summary)
    if data["failed"]:
        raise typer.Exit(1)


@app.command()
def plan(
    idea: IdeaOpt,
    scenes: ScenesOpt = 3,
    target_seconds: SecondsOpt = 12.0,
    style: StyleOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    config: ConfigOpt = None,
    llm_backend: BackendOpt = None,
    llm_url: UrlOpt = None,
    llm_model: ModelOpt = None,
) -> None:
    """Write the story and the validated shot plan; with --json, stdout holds only JSON."""
    from .llm import open_llm
    from .planner import Planner, plan_from_story

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, {"style": style, **{
            f"llm.{k}": v for k, v in _llm_overrides(llm_backend, llm_url, llm_model).items()}})
        spec = RunSpec(idea=idea, scenes=scenes, target_seconds=target_seconds,
                       style=settings.style, engine=settings.engine, output_dir=Path("."))
        with open_llm(settings.llm) as llm:
            planner = Planner(llm, max_tries=settings.llm.max_repair_tries,
                              temperature=settings.llm.temperature)
            story = planner.write_story(spec.idea, spec.style, spec.scenes)
            result = plan_from_story(planner, idea=spec.idea, story=story, style=spec.style,
                                     scenes=spec.scenes, target_seconds=spec.target_seconds,
                                     video=settings.video)
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
        return
    typer.echo(f"{result.idea}  ({result.duration_s:.1f}s, {len(result.shots)} shots)\n")
    typer.echo(result.story + "\n")
    for scene in result.scenes:
        typer.echo(f"Scene {scene.index + 1}: {scene.title} - {scene.setting}")
        for shot in scene.shots:
            typer.echo(f"  {shot.id} [{shot.frames} f, {shot.camera}] {shot.action}")


def _check(label: str, fn: Any) -> bool:
    try:
        detail = fn()
        typer.echo(f"[ok]   {label}: {detail}")
        return True
    except Exception as err:  # doctor reports every failure, it never stops at one
        typer.echo(f"[FAIL] {label}: {err}")
        return False


def _llm_status(settings: Settings) -> str:
    from .llm import open_llm

    with open_llm(settings.llm) as llm:
        return f"{llm.description} answers; models: {', '.join(llm.models())}"


def _engine_status(settings: Settings) -> str:
    from .engines import make_engine

    engine = make_engine(settings)
    try:
        status = engine.check()
    finally:
        engine.close()
    if not status.ok:
        raise RuntimeError(status.detail)
    return status.detail


def _gpu_status(settings: Settings) -> str:
    from resource_broker.gpu import open_monitor

    return open_monitor(settings.broker.gpu_index).describe()


def _prefect_status() -> str:
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "no PREFECT_API_URL: flows run in Prefect's ephemeral mode (local, temporary)"
    r = httpx.get(f"{url.rstrip('/')}/health", timeout=5)
    r.raise_for_status()
    return f"Prefect API at {url} answers"


def _disk_status(settings: Settings, batch_file: Path | None, seconds: float) -> str:
    import shutil

    from .batch import load_batch

    out = Path(settings.output_dir).resolve()
    probe = out if out.exists() else out.parent
    free = shutil.disk_usage(probe).free
    ideas = len(load_batch(batch_file).entries) if batch_file else 1
    v = settings.video
    # clips + final, H.264 at under 0.3 bytes per pixel-frame, plus 200 MiB of slack
    need = int(2 * ideas * seconds * v.fps * v.width * v.height * 0.3) + 200 * 2**20
    if free < need:
        raise RuntimeError(f"{out}: {free / 2**30:.1f} GiB free, the batch needs about "
                           f"{need / 2**30:.1f} GiB: free some space or change output_dir")
    return (f"{out}: {free / 2**30:.1f} GiB free, about {need / 2**30:.2f} GiB needed for "
            f"{ideas} idea(s)")


def _pool_status(settings: Settings) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return "ephemeral mode: no work pool or concurrency limit needed for local runs"
    with get_client(sync_client=True) as client:
        pools = {p.name for p in client.read_work_pools()}
        if "story-to-video" not in pools:
            raise RuntimeError("work pool 'story-to-video' missing: prefect work-pool create "
                               "story-to-video --type process")
        name = f"gpu-{settings.broker.gpu_index}"
        limits = {g.name: g.limit for g in client.read_global_concurrency_limits()}
    have = f"limit {name}={limits[name]}" if name in limits else \
        f"limit {name} will be created on the first GPU run"
    return f"work pool 'story-to-video' exists; {have}"


@app.command()
def doctor(
    config: ConfigOpt = None,
    batch_file: Annotated[Path | None, typer.Option(
        "--batch", help="also size the disk check for this batch file")] = None,
    target_seconds: SecondsOpt = 12.0,
) -> None:
    """Check everything a night needs and say what to fix; exits 1 when something fails."""
    try:
        settings = load_settings(config)
    except ConfigError as err:
        _fail(err)
    checks = [
        _check(f"LLM ({settings.llm.backend})", lambda: _llm_status(settings)),
        _check(f"engine ({settings.engine})", lambda: _engine_status(settings)),
        _check("GPU", lambda: _gpu_status(settings)),
        _check("Prefect", _prefect_status),
        _check("work pool", lambda: _pool_status(settings)),
        _check("disk", lambda: _disk_status(settings, batch_file, target_seconds)),
    ]
    if not all(checks):
        raise typer.Exit(1)


workflows_app = typer.Typer(help="ComfyUI workflows: check them before spending GPU time.")
app.add_typer(workflows_app, name="workflows")


@workflows_app.command("check")
def workflows_check(
    file: Annotated[Path, typer.Argument(help="API-format workflow JSON")],
    binding: Annotated[Path | None, typer.Option(
        "--binding", help="binding TOML; default: FILE's name with .binding.toml")] = None,
    comfyui_url: Annotated[str | None, typer.Option(
        "--comfyui-url", help="also check classes, inputs and model files against it")] = None,
) -> None:
    """Check a workflow and its binding; exits non-zero with the reasons."""
    from .engines.comfyui import BoundWorkflow, ComfyUIClient, ComfyUIError

    binding = binding or file.with_name(file.name.removesuffix(".json") + ".binding.toml")
    try:
        bound = BoundWorkflow.load(binding, file)
        problems: list[str] = []
        if comfyui_url:
            client = ComfyUIClient(comfyui_url)
            try:
                problems = bound.online_problems(client.object_info())
            finally:
                client.close()
    except ComfyUIError as err:
        _fail(err)
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    where = f" and against {comfyui_url}" if comfyui_url else " (offline checks only)"
    typer.echo(f"ok: {file} with {binding} checks out{where}")


broker_app = typer.Typer(help="GPU resource broker.")
app.add_typer(broker_app, name="broker")


@broker_app.command("plan")
def broker_plan(
    model: Annotated[str, typer.Option("--model", help="wan2.2-14b | wan2.2-5b | ...")],
    frames: Annotated[int, typer.Option("--frames")],
    width: Annotated[int, typer.Option("--width")],
    height: Annotated[int, typer.Option("--height")],
    budget_gib: Annotated[float, typer.Option("--budget-gib", help="VRAM budget")],
    llm_gib: Annotated[float, typer.Option("--llm-gib", help="VRAM the LLM holds")] = 0.0,
    margin_gib: Annotated[float, typer.Option("--margin-gib")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Dry run, no GPU touched: predicted peak of each stage and the broker's actions."""
    from pydantic import ValidationError

    from resource_broker.cost_model import CostModel
    from resource_broker.policy import BudgetTooSmall, plan_shot

    from .models import Shot

    try:
        Shot(id="s01_sh01", scene_index=0, shot_index=0, action="-", prompt="-",
             frames=frames, fps=16, width=width, height=height, seed=0)
        result = plan_shot(CostModel.for_model(model), frames, width, height,
                           budget_gib=budget_gib, margin_gib=margin_gib, llm_gib=llm_gib)
    except ValidationError as err:
        _fail(ValueError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())))
    except (BudgetTooSmall, ValueError) as err:
        _fail(err)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    typer.echo(f"{model}: {frames} frames at {width}x{height}, budget {budget_gib} GiB "
               f"(margin {margin_gib}), LLM {llm_gib} GiB")
    typer.echo("cost (GiB): " + ", ".join(f"{k} {v}" for k, v in result.cost.items()))
    typer.echo("predicted peak per stage (GiB): " + ", ".join(
        f"{k} {v}" for k, v in result.stage_peaks_gib.items()) + f"; peak {result.peak_gib}")
    for d in result.decisions:
        extra = f" {d.params}" if d.params else ""
        typer.echo(f"  {d.stage:8} {d.action:26} need {d.predicted_gib:6.2f} GiB of "
                   f"{d.available_gib:6.2f}: {d.reason}{extra}")


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
