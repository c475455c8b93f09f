"""`story-to-video` command line. Every failure is one clear line on stderr and an exit code:
0 done, 1 finished but something failed (a batch idea, a doctor check, a workflow check),
2 bad input (flags, settings, files), 3 a service failed (the LLM server, ComfyUI),
4 an unexpected error (a bug, or Prefect itself failing: STV_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from resource_broker.gpu import GpuUnavailable
from resource_broker.policy import BudgetTooSmall

from .batch import BatchFileError
from .config import ConfigError, Settings, load_settings
from .engines.base import VideoEngineError
from .engines.comfyui.errors import PromptValidationError, WorkflowError
from .llm.base import LLMConfigError, LLMError
from .run import InputError, RunFolder, RunSpec
from .textsafe import one_line, terminal

EXIT_SOME_FAILED, EXIT_BAD_INPUT, EXIT_SERVICE_FAILED, EXIT_BUG = 1, 2, 3, 4

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a one-line idea into a finished video on one local GPU.  Exit "
                  "codes: 0 done, 1 some items failed, 2 bad input, 3 a service (LLM server, "
                  "ComfyUI) failed, 4 internal error.")

BAD_INPUT = (ConfigError, InputError, LLMConfigError, WorkflowError, PromptValidationError,
             GpuUnavailable, BudgetTooSmall, BatchFileError)
SERVICE_FAILED = (LLMError, VideoEngineError)
USER_ERRORS = (*BAD_INPUT, *SERVICE_FAILED)

IdeaOpt = Annotated[str, typer.Option("--idea", help="the one-line idea")]
ScenesOpt = Annotated[int, typer.Option("--scenes", help="number of scenes")]
SecondsOpt = Annotated[float, typer.Option("--target-seconds", help="length of the video")]
StyleOpt = Annotated[str | None, typer.Option("--style", help="style or genre")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]
BackendOpt = Annotated[str | None, typer.Option(
    "--llm-backend", help="llamacpp-embedded | lmstudio | ollama | openai-compatible")]
UrlOpt = Annotated[str | None, typer.Option("--llm-url", help="OpenAI-compatible base URL")]
ModelOpt = Annotated[str | None, typer.Option("--llm-model", help="model name on the server")]


def _fail(err: BaseException) -> NoReturn:
    service = isinstance(err, SERVICE_FAILED) and not isinstance(err, BAD_INPUT)
    code = EXIT_SERVICE_FAILED if service else EXIT_BAD_INPUT
    for line in getattr(err, "eta_text", []):  # a night that does not fit shows its ETA
        typer.echo(terminal(line), err=True)
    lines = [one_line(line, 1000) for line in str(err).splitlines() if line.strip()]
    for line in lines or [type(err).__name__]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Known failures become one line and their exit code."""
    try:
        yield
    except USER_ERRORS as err:
        _fail(err)


class _NoTraceback(logging.Formatter):
    """Formats a record as `inner` does, without its traceback."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord(
                {**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(record)


def _terminal_logs_without_tracebacks() -> None:
    """Prefect logs a failed run's traceback to the terminal; the CLI says what failed in one
    line instead. The Prefect UI and API logs keep the tracebacks; STV_DEBUG=1 shows them."""
    if os.environ.get("STV_DEBUG"):
        return
    for name in ("", "uvicorn", "fastapi"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter or logging.Formatter()))


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
    from .planner import check_target_reachable

    with _errors():
        # Fail on bad input now, before Prefect starts its temporary server.
        llm = _llm_overrides(llm_backend, llm_url, llm_model)
        settings = load_settings(config, {"engine": engine, "style": style, **{
            f"llm.{k}": v for k, v in llm.items()}})
        spec = RunSpec(idea=idea, scenes=scenes, target_seconds=target_seconds,
                       style=settings.style, engine=settings.engine,
                       output_dir=output or Path(settings.output_dir), run_name=run_name)
        check_target_reachable(scenes, target_seconds, settings.video)
        RunFolder(spec).check_identity()
        from flows.pipeline import story_to_video

        _terminal_logs_without_tracebacks()
        final = story_to_video(
            idea=idea, scenes=scenes, target_seconds=target_seconds, style=style,
            engine=engine, output_dir=str(output) if output else None,
            config_file=str(config) if config else None, llm=llm or None, run_name=run_name,
        )
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

    from flows.night import NightOptions, parse_until, run_night

    from .batch import load_batch

    with _errors():
        settings = load_settings(config, {"engine": engine})
        # --scenes and --target-seconds checked as a run checks them, before any work
        RunSpec(idea="batch", scenes=scenes, target_seconds=target_seconds,
                style=settings.style, engine=settings.engine, output_dir=Path("."))
        parsed = load_batch(file)
        for problem in parsed.problems:
            typer.echo(f"warning: {file}: {problem.where}: {one_line(problem.reason)} "
                       "(skipped)", err=True)
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

        _terminal_logs_without_tracebacks()
        summary = story_to_video(batch=str(file), scenes=scenes, target_seconds=target_seconds,
                                 engine=settings.engine,
                                 output_dir=str(output) if output else None,
                                 config_file=str(config) if config else None, until=until)
    data = json.loads(Path(summary).read_text())
    typer.echo(f"done {len(data['done'])}, failed {len(data['failed'])}, "
               f"skipped {len(data['skipped'])}, left for the next night "
               f"{len(data.get('left', []))}", err=True)
    for item in data["failed"]:
        typer.echo(f"failed {item['where']} ({one_line(item['idea'], 80)}): "
                   f"{one_line(item['reason'])}", err=True)
    for item in data.get("left", []):
        typer.echo(f"left {item['where']} ({one_line(item['idea'], 80)}): "
                   f"{item['shots_done']} shot(s) done, the rest next night", err=True)
    night = data.get("night") or {}
    if night:
        typer.echo(f"predicted {night['predicted_s']['total']:.0f}s, took "
                   f"{night['measured_s']['total']:.0f}s (ETA error "
                   f"{100 * night['eta_error']:+.0f}%)", err=True)
    typer.echo(summary)
    if data["failed"]:
        raise typer.Exit(EXIT_SOME_FAILED)


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
    from .planner import Planner, check_target_reachable, plan_from_story

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _errors():
        settings = load_settings(config, {"style": style, **{
            f"llm.{k}": v for k, v in _llm_overrides(llm_backend, llm_url, llm_model).items()}})
        spec = RunSpec(idea=idea, scenes=scenes, target_seconds=target_seconds,
                       style=settings.style, engine=settings.engine, output_dir=Path("."))
        check_target_reachable(spec.scenes, spec.target_seconds, settings.video)
        with open_llm(settings.llm) as llm:
            planner = Planner(llm, max_tries=settings.llm.max_repair_tries,
                              temperature=settings.llm.temperature)
            story = planner.write_story(spec.idea, spec.style, spec.scenes)
            result = plan_from_story(planner, idea=spec.idea, story=story, style=spec.style,
                                     scenes=spec.scenes, target_seconds=spec.target_seconds,
                                     video=settings.video)
    if as_json:  # JSON escapes every control character itself
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
        return
    # LLM text goes to the terminal only through textsafe: no escape sequence survives.
    typer.echo(f"{terminal(result.idea)}  ({result.duration_s:.1f}s, {len(result.shots)} "
               "shots)\n")
    typer.echo(terminal(result.story) + "\n")
    for scene in result.scenes:
        typer.echo(f"Scene {scene.index + 1}: {one_line(scene.title, 200)} - "
                   f"{one_line(scene.setting, 400)}")
        for shot in scene.shots:
            typer.echo(f"  {shot.id} [{shot.frames} f, {shot.camera}] {one_line(shot.action)}")


def _check(label: str, fn: Any) -> bool:
    try:
        detail = fn()
        typer.echo(f"[ok]   {label}: {one_line(str(detail), 1000)}")
        return True
    except Exception as err:  # doctor reports every failure, it never stops at one
        typer.echo(f"[FAIL] {label}: {one_line(str(err), 1000) or type(err).__name__}")
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
        from flows.gpu import gpu_limit_name

        name = gpu_limit_name(settings.broker.gpu_index)
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
    with _errors():
        settings = load_settings(config)
    checks = [
        _check(f"LLM ({settings.llm.backend})", lambda: _llm_status(settings)),
        _check(f"engine ({settings.engine})", lambda: _engine_status(settings)),
        _check("GPU", lambda: _gpu_status(settings)),
        _check("Prefect", _prefect_status),
        _check("work pool", lambda: _pool_status(settings)),
        _check("disk", lambda: _disk_status(settings, batch_file, target_seconds)),
    ]
    if not all(checks):
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
def worker(
    gpu: Annotated[int, typer.Option("--gpu", help="the GPU's index as NVML counts it")],
    name: Annotated[str | None, typer.Option(
        "--name", help="worker and queue name (default <host>-gpu<N>)")] = None,
    comfyui_url: Annotated[str | None, typer.Option(
        "--comfyui-url", help="this GPU's ComfyUI (sets STV_COMFYUI__URL)")] = None,
    pool: Annotated[str, typer.Option("--pool", help="the Prefect work pool")] =
        "story-to-video",
    config: ConfigOpt = None,
) -> None:
    """A Prefect worker bound to one GPU: checks the GPU exists (else it never starts), then
    runs `prefect worker start` with the GPU in its environment, polling the pool's default
    queue and a queue named after itself (where the overnight run sends its shard)."""
    import signal
    import subprocess

    from flows.gpu import gpu_limit_name

    from .worker import check_gpu, default_name, ensure_queue, hold_gpu_marker, worker_env

    name = name or default_name(gpu)
    with _errors():
        settings = load_settings(config)
        checked = check_gpu(gpu, settings.broker.gpu_count)
        ensure_queue(pool, name)
    _marker, other = hold_gpu_marker(gpu, name)
    typer.echo(f"worker {name}: {checked}", err=True)
    if other:
        typer.echo(f"warning: GPU {gpu} of this host already has a worker ({other}); both "
                   f"take runs, and the per-GPU limit {gpu_limit_name(gpu)} gives the card to "
                   "one heavy job at a time: the other waits, and its log says so", err=True)
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen(
        [prefect, "worker", "start", "--pool", pool, "--name", name, "--work-queue",
         "default", "--work-queue", name],
        env=worker_env(gpu, name, comfyui_url, dict(os.environ)))
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the terminal sent it to the worker as well
        code = proc.wait()
    raise typer.Exit(code)


@app.command()
def serve(
    folders: Annotated[list[Path] | None, typer.Option(
        "--dir", help="folder holding run folders (repeatable); default: output_dir")] = None,
    host: Annotated[str | None, typer.Option("--host", help="default: from ui.media_url")] = None,
    port: Annotated[int | None, typer.Option("--port", help="default: from ui.media_url")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the run folders over HTTP so the videos linked in the Prefect UI play."""
    from urllib.parse import urlsplit

    from .serve import serve as run_server

    try:
        settings = load_settings(config)
    except ConfigError as err:
        _fail(err)
    url = urlsplit(settings.ui.media_url)
    if not folders:  # the control room may open before the first night: runs land here
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    roots = folders or [Path(settings.output_dir)]
    for root in roots:
        if not root.is_dir():
            _fail(InputError(f"{root} is not a folder: give the folder that holds the run "
                             "folders with --dir"))
    host, port = host or url.hostname or "127.0.0.1", port or url.port or 80
    typer.echo(f"serving {', '.join(str(r.resolve()) for r in roots)} at http://{host}:{port}"
               f" (the UI links to {settings.ui.media_url}: set ui.media_url if that differs)",
               err=True)
    run_server(roots, host, port)


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
    from .config import check_url
    from .engines.comfyui import BoundWorkflow, ComfyUIClient

    binding = binding or file.with_name(file.name.removesuffix(".json") + ".binding.toml")
    with _errors():
        if comfyui_url:
            try:
                check_url(comfyui_url)
            except ValueError as err:
                raise ConfigError(f"--comfyui-url {comfyui_url!r}: {err}") from None
        bound = BoundWorkflow.load(binding, file)
        problems: list[str] = bound.keyframe_problems() if bound.binding.output == "image" \
            else []
        if comfyui_url:
            client = ComfyUIClient(comfyui_url)
            try:
                problems += bound.online_problems(client.object_info())
            finally:
                client.close()
    for p in problems:
        typer.echo(f"problem: {one_line(p, 1000)}", err=True)
    if problems:
        raise typer.Exit(EXIT_SOME_FAILED)
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
    memory_mode: Annotated[str, typer.Option(
        "--memory-mode", help="who manages VRAM in ComfyUI: dynamic (0.33's default), "
        "estimate (--disable-dynamic-vram or older), cpu")] = "dynamic",
    strategy: Annotated[str, typer.Option(
        "--strategy", help="auto | one-prompt | staged | broker")] = "auto",
    shots: Annotated[int, typer.Option("--shots", help="shots in the batch")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Dry run, no GPU touched: which case applies and why, the predicted peak of each stage
    and the broker's actions."""
    from pydantic import ValidationError

    from resource_broker.cost_model import CostModel
    from resource_broker.policy import pass_major_case, plan_shot

    from .models import Shot

    try:
        Shot(id="s01_sh01", scene_index=0, shot_index=0, action="-", prompt="-",
             frames=frames, fps=16, width=width, height=height, seed=0)
        cost = CostModel.for_model(model)
        result = plan_shot(cost, frames, width, height,
                           budget_gib=budget_gib, margin_gib=margin_gib, llm_gib=llm_gib,
                           memory_mode=memory_mode, strategy=strategy)
    except ValidationError as err:
        _fail(ValueError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())))
    except (BudgetTooSmall, ValueError) as err:
        _fail(err)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    typer.echo(f"{model}: {frames} frames at {width}x{height}, budget {budget_gib} GiB "
               f"(margin {margin_gib}), LLM {llm_gib} GiB")
    case = pass_major_case(cost.shot(frames, width, height), cost.spec.experts,
                           memory_mode=memory_mode, strategy=strategy, shots=shots,
                           budget_gib=budget_gib, margin_gib=margin_gib)[1]
    typer.echo("case: " + case)
    typer.echo("cost (GiB): " + ", ".join(f"{k} {v}" for k, v in result.cost.items()))
    typer.echo("predicted peak per stage (GiB): " + ", ".join(
        f"{k} {v}" for k, v in result.stage_peaks_gib.items()) + f"; peak {result.peak_gib}")
    for d in result.decisions:
        extra = f" {d.params}" if d.params else ""
        typer.echo(f"  {d.stage:8} {d.action:26} need {d.predicted_gib:6.2f} GiB of "
                   f"{d.available_gib:6.2f}: {d.reason}{extra}")


# Prefect's temporary server (a run without PREFECT_API_URL) must not print failures that are
# not ours: telemetry cannot reach the internet on an offline machine, and its SQLite waits
# only 10 s for a lock by default, which a busy 2-core machine exceeds ("database is locked").
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
                    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
                    # our modules log outside flow runs too (preflight, assembly helpers)
                    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for stream in (sys.stdout, sys.stderr):  # a character the terminal cannot show becomes ?
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        app()
    except BrokenPipeError:  # `story-to-video plan --json | head`: the reader left, fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_SOME_FAILED)
    except Exception as err:  # the last resort: a bug still ends in one line, not a traceback
        if os.environ.get("STV_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(err).__name__}: {one_line(str(err))} (if it "
                   "persists, run again with STV_DEBUG=1 and report the traceback)", err=True)
        sys.exit(EXIT_BUG)
