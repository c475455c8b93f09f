"""The night as one plan: a batch run stage by stage across all its ideas.

1. ETA: every idea's shots (its plan, or an estimate from its parameters), the render order
   and the time model give the predicted time of each stage and idea and the finish; with a
   window (`--until`) only what fits is scheduled, the rest is left for the next night.
2. Plan: the LLM is started (or attached) once and writes and plans every idea; an idea
   whose plan fails is recorded and the others go on.
3. Render: the LLM is moved off the GPU once, then every shot of every idea is rendered in
   the order of `resource_broker.schedule` (pass-major across ideas where it pays), and
   each idea is assembled as soon as its last shot is done. No new group starts when it
   would overrun the window.

Work is claimed (plans, shots, assembly), so several workers can share a night, and a
re-run resumes: finished plans, shots and videos are never redone. `NightEnv` is the world
the night runs in: `RealNight` (LLM servers, engines, the GPU, Prefect tasks) or the
simulated one of `benchmarks/night_sim.py`, which runs this same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, cast
from uuid import UUID

from flows.gpu import GpuSession, gpu_session, gpu_slot, llm_control
from resource_broker.broker import Broker
from resource_broker.cost_model import CostModel
from resource_broker.llm_control import LLMControl
from resource_broker.policy import BudgetTooSmall, plan_shot
from resource_broker.schedule import (
    PACK_S,
    Group,
    IdeaPlan,
    NightEta,
    WorkItem,
    fit_window,
    group_seconds,
    plan_groups,
    predict,
)
from resource_broker.time_model import EngineProfile, TimeModel
from story_to_video.atomic import write_json_atomic
from story_to_video.batch import BatchEntry, ParsedBatch
from story_to_video.config import Settings, load_settings
from story_to_video.engines import VideoEngine, make_engine
from story_to_video.llm import LLMBackend, connect_llm, llm_server
from story_to_video.locks import claim, claimed, release
from story_to_video.models import Shot, ShotPlan
from story_to_video.planner import allocate_frames, min_shots_per_scene
from story_to_video.report import write_report
from story_to_video.run import InputError, RunFolder, RunSpec, safe_name
from story_to_video.start_images import Source, StartImages, UserImages, for_run, sources
from story_to_video.ui import run_slug
from tasks.assemble import assemble_video
from tasks.keyframe import render_keyframes
from tasks.plan import plan_shots
from tasks.render import DiskFull, render_group_pass_major, render_shot, taken
from tasks.story import write_story

log = logging.getLogger("story_to_video.night")
TIME_MODEL_FILE = ".time-model.json"


class NightDoesNotFit(InputError):
    """Nothing of the batch fits the window; the message says by how much."""

    def __init__(self, message: str, eta_text: list[str]) -> None:
        super().__init__(message)
        self.eta_text = eta_text


# -- the ideas of a night --------------------------------------------------------------------

@dataclass(eq=False)  # identity: an idea is itself, also as a dict key
class Idea:
    index: int
    where: str
    text: str
    settings: Settings
    folder: RunFolder
    plan: ShotPlan | None = None
    status: str = "pending"  # pending | planned | done | failed | left
    reason: str = ""
    final: str | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    started_at: float = 0.0
    llm: str = "reused plan"
    user: UserImages = field(default_factory=UserImages)  # the entry's start images

    @property
    def label(self) -> str:
        return f"{self.where}: {self.text[:60]}"


def read_ideas(parsed: ParsedBatch, scenes: int, target_seconds: float,
               common: dict[str, Any], summary: dict[str, list[dict[str, Any]]]
               ) -> list[Idea]:
    """Validated ideas with their settings and run folders (not created yet); duplicates
    and bad entries go to the summary as skipped, a bad setting fails only its idea."""
    ideas: list[Idea] = []
    seen: dict[tuple[Any, ...], str] = {}
    for problem in parsed.problems:
        log.error("batch %s: %s: skipped", problem.where, problem.reason)
        summary["skipped"].append({"where": problem.where, "reason": problem.reason})
    for where, entry in parsed.entries:
        try:
            settings, spec = _spec(entry, scenes, target_seconds, common)
        except (InputError, ValueError) as err:
            summary["failed"].append({"where": where, "idea": entry.idea,
                                      "reason": f"{type(err).__name__}: {err}"})
            continue
        ident = (spec.idea.casefold(), spec.scenes, spec.target_seconds, spec.style,
                 spec.engine, spec.run_name)
        if ident in seen:
            reason = f"duplicate of {seen[ident]}"
            log.warning("batch %s: %s: skipped", where, reason)
            summary["skipped"].append({"where": where, "idea": entry.idea, "reason": reason})
            continue
        seen[ident] = where
        folder = RunFolder(spec)
        ideas.append(Idea(len(ideas), where, spec.idea, settings, folder,
                          plan=_load_plan(folder),
                          user=UserImages(dict(entry.start_images or {}),
                                          dict(entry.character_images or {}))))
    return ideas


def _spec(entry: BatchEntry, scenes: int, target_seconds: float, common: dict[str, Any]
          ) -> tuple[Settings, RunSpec]:
    overrides: dict[str, Any] = {"style": entry.style or common.get("style"),
                                 "engine": entry.engine or common.get("engine"),
                                 "output_dir": common.get("output_dir")}
    overrides.update({f"llm.{k}": v for k, v in (common.get("llm") or {}).items()})
    settings = load_settings(common.get("config_file"), overrides)
    spec = RunSpec(idea=entry.idea, scenes=entry.scenes or scenes,
                   target_seconds=entry.target_seconds or target_seconds,
                   style=settings.style, engine=settings.engine,
                   output_dir=Path(settings.output_dir), run_name=entry.run_name)
    return settings, spec


def _load_plan(folder: RunFolder) -> ShotPlan | None:
    try:
        return folder.load_plan()
    except ValueError:  # a plan that no longer validates is planned again
        return None


# -- what the ETA needs to know --------------------------------------------------------------

def engine_profile(settings: Settings, budget_gib: float | None = None) -> EngineProfile:
    """Steps, CFG and model of the configured engine's workflow; block swap if the broker
    would plan it at this budget (known only when the GPU or a budget is)."""
    if settings.engine == "preview":
        return EngineProfile("preview", steps=())
    import workflows
    from story_to_video.engines.comfyui import BoundWorkflow

    cfg = settings.comfyui
    bound = BoundWorkflow.load(workflows.binding_path(cfg.binding or cfg.workflow))
    wf, b = bound.workflow, bound.binding

    def value(name: str, default: int) -> int:
        targets = b.inputs.get(name) or []
        return int(wf[targets[0][0]]["inputs"].get(targets[0][1], default)) if targets \
            else default

    total = value("steps", 20)
    if b.two_expert:
        split = value("split_step", total // 2)
        steps: tuple[int, ...] = (split, total - split)
    else:
        steps = (total,)
    sampler = b.nodes.high_sampler or (b.inputs.get("steps") or [("", "")])[0][0]
    cfg_scale = float(wf.get(sampler, {}).get("inputs", {}).get("cfg", 1.0))
    budget = budget_gib or settings.broker.budget_gib
    offload = False
    if budget is not None:
        v = settings.video
        with contextlib.suppress(BudgetTooSmall):
            p = plan_shot(CostModel.for_model(b.model), 81, v.width, v.height,
                          budget_gib=budget, margin_gib=settings.broker.safety_margin_gib)
            offload = p.decision("experts").action == "block-swap"
    # A ComfyUI the project starts runs dynamic VRAM unless its command turns it off; one
    # the night attaches to is read when it starts (ServerInfo), assumed classic until then.
    dynamic = cfg.command is not None and "--disable-dynamic-vram" not in cfg.command
    return EngineProfile("comfyui", b.model, steps, 2 if cfg_scale > 1.0 else 1, offload,
                         dynamic)


def llm_moves(settings: Settings, first: WorkItem | None) -> tuple[int, int]:
    """LLM loads the broker will cause before and after the render phase (it places the
    LLM for the night's first shot), from the LLM's configured size (`broker.llm_gib`) and
    the backend; no server is asked."""
    gib, budget = settings.broker.llm_gib, settings.broker.budget_gib
    if settings.engine == "preview" or gib <= 0 or budget is None or first is None:
        return (0, 0)
    project_server = settings.llm.backend == "llamacpp-embedded" or settings.llm.server_command
    if not project_server and settings.llm.backend not in ("lmstudio", "ollama"):
        return (0, 0)  # uncontrolled: nothing moves
    profile = engine_profile(settings)
    try:
        d = plan_shot(CostModel.for_model(profile.model), *first.shape,
                      budget_gib=budget, margin_gib=settings.broker.safety_margin_gib,
                      llm_gib=gib).decision("llm")
    except BudgetTooSmall:
        return (0, 0)
    if d.action == "keep-on-gpu":
        return (0, 0)
    before = 1 if d.action == "partial-offload" or project_server else 0
    return (before, 0 if project_server else 1)  # a project server stops with the night


def shot_deps(idea: Idea, shot: Shot) -> tuple[str, ...]:
    """Shots this one starts from: the shot before it in its scene, when chained."""
    return _deps(idea_sources(idea).get(shot.id))


def idea_sources(idea: Idea) -> dict[str, Source]:
    """Where each planned shot's start image comes from; nothing for a workflow without one."""
    if idea.plan is None or not takes_start_image(idea.settings):
        return {}
    return sources(idea.plan, idea.settings.video.start_images, idea.user)


def _deps(src: Source | None) -> tuple[str, ...]:
    return (src.after,) if src is not None and src.after else ()


def takes_start_image(settings: Settings) -> bool:
    """Whether the configured workflow starts clips from images (the preview engine does)."""
    if settings.engine == "preview":
        return True
    import workflows
    from story_to_video.engines.comfyui import BoundWorkflow

    cfg = settings.comfyui
    bound = BoundWorkflow.load(workflows.binding_path(cfg.binding or cfg.workflow))
    return "start_image" in bound.binding.inputs


def idea_items(idea: Idea) -> tuple[list[WorkItem], bool]:
    """The idea's work items: its planned shots, or an estimate before the LLM planned it
    (shots per scene as the planner would aim for, frames split from the target)."""
    if idea.plan is not None:
        found = idea_sources(idea)
        return [WorkItem(idea.index, s.id, s.frames, s.width, s.height, _deps(src),
                         src is not None and src.kind == "keyframe")
                for s in idea.plan.shots for src in [found.get(s.id)]], False
    spec, v = idea.folder.spec, idea.settings.video
    per_scene = min(v.max_shots_per_scene,
                    max(2, min_shots_per_scene(spec.target_seconds, v.fps, spec.scenes)))
    frames = allocate_frames(spec.scenes * per_scene, spec.target_seconds, v.fps)
    mode = v.start_images if takes_start_image(idea.settings) else "none"
    return [WorkItem(idea.index, f"s{n // per_scene + 1:02d}_sh{n % per_scene + 1:02d}", f,
                     v.width, v.height,
                     keyframe=mode == "keyframe" or (mode == "keyframe+chain"
                                                     and n % per_scene == 0))
            for n, f in enumerate(frames)], True


def idea_plans(ideas: list[Idea], profiles: dict[int, EngineProfile],
               fingerprints: dict[int, str],
               prepared: Callable[[Idea, Shot], Shot | None] | None = None
               ) -> list[IdeaPlan]:
    """`prepared`: the shot as it is rendered (its start image), None while it waits."""
    out = []
    for idea in ideas:
        items, estimated = idea_items(idea)
        done: set[str] = set()
        if idea.plan is not None and idea.index in fingerprints:
            for shot in idea.plan.shots:
                s = prepared(idea, shot) if prepared else shot
                if s is None:
                    continue
                key = idea.folder.shot_key(s, fingerprints[idea.index])
                if idea.folder.finished_record(s, key) is not None:
                    done.add(f"{idea.index}/{s.id}")
        out.append(IdeaPlan(idea.index, idea.label, profiles[idea.index], items,
                            needs_plan=idea.plan is None, estimated=estimated,
                            done_items=done))
    return out


def _hm(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}" if m >= 60 else f"{m} min"


def eta_lines(eta: NightEta, start: float, until: float | None = None) -> list[str]:
    """The ETA as a person reads it: stages, ideas, finish, what is left."""
    at = datetime.fromtimestamp

    def clock(t: float) -> str:
        return at(t).strftime("%H:%M")

    lines = ["ETA: " + ", ".join(f"{k.replace('_', ' ')} {_hm(v)}"
                                 for k, v in eta.stages.items())
             + f"; {eta.groups} render group(s), {eta.loads} set(s) of model loads"]
    for row in eta.ideas:
        est = " (estimated before planning)" if row.estimated else ""
        lines.append(f"  {row.label}: {row.shots} shots{est}, plan {_hm(row.plan_s)}, "
                     f"render {_hm(row.render_s)}, assemble {_hm(row.assemble_s)}, "
                     f"done at {clock(start + row.finish_s)}")
    lines.append(f"predicted finish {clock(start + eta.total_s)} "
                 f"({_hm(eta.total_s)} from {clock(start)})")
    if until is not None:
        lines.append(f"window until {clock(until)} ({_hm(max(0.0, until - start))})")
    if eta.left:
        lines.append(f"left for the next night: {len(eta.left)} idea(s)")
    return lines


def parse_until(text: str, now: float) -> float:
    """HH:MM local time -> epoch seconds; a time not later than now means tomorrow."""
    try:
        hh, mm = (int(x) for x in text.split(":"))
        now_dt = datetime.fromtimestamp(now)
        target = now_dt.replace(hour=hh, minute=mm, second=0, microsecond=0)
    except ValueError:
        raise InputError(f"--until {text!r}: give a local time as HH:MM, e.g. 06:30") from None
    if target.timestamp() <= now:
        target += timedelta(days=1)
    return target.timestamp()


# -- the world the night runs in -------------------------------------------------------------

class LLMSession(Protocol):
    backend: LLMBackend
    load_s: float  # seconds it took to start the LLM (0 when attached)

    def after_planning(self) -> None: ...

    def control(self, settings: Settings) -> LLMControl: ...

    def close(self) -> None: ...


class NightEnv(Protocol):
    def clock(self) -> float: ...

    def open_llm(self, settings: Settings, log_dir: Path) -> LLMSession: ...

    def engine(self, idea: Idea) -> VideoEngine: ...

    def gpu(self, settings: Settings, engine: VideoEngine, out_dir: Path,
            llm: LLMControl | None) -> contextlib.AbstractContextManager[GpuSession]: ...

    def assemble(self, idea: Idea, records: list[dict[str, Any]], run_info: dict[str, Any],
                 gpu: GpuSession | None) -> str: ...

    def progress(self, text: str, share: float) -> None: ...

    def publish_eta(self, lines: list[str], eta: NightEta) -> None: ...

    def close(self) -> None: ...


class RealLLMSession:
    """The night's LLM: the project's server started once (or the user's server attached)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.cfg = settings.llm
        self.server = llm_server(self.cfg, log_dir)
        self.load_s = 0.0
        t0 = time.monotonic()
        url = self.server.start() if self.server is not None else self.cfg.resolved_base_url()
        self.load_s = time.monotonic() - t0 if self.server is not None else 0.0
        try:
            self.backend: LLMBackend = connect_llm(self.cfg, url or "")
        except Exception:
            self.close()
            raise

    def after_planning(self) -> None:
        """A project server on the CPU holds no VRAM and nothing needs it until the next
        night: stop it now. One with GPU layers is left for the broker to move."""
        if self.server is not None and self.server.gpu_layers == 0:
            self.server.stop()

    def control(self, settings: Settings) -> LLMControl:
        return llm_control(settings, self.server)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class RealNight:
    """Real servers, engines, GPU and Prefect tasks."""

    def __init__(self) -> None:
        self._engines: dict[str, VideoEngine] = {}
        self._progress: UUID | None = None

    def clock(self) -> float:
        return time.time()

    def open_llm(self, settings: Settings, log_dir: Path) -> LLMSession:
        return RealLLMSession(settings, log_dir)

    def engine(self, idea: Idea) -> VideoEngine:
        s = idea.settings
        if s.engine == "preview":  # cheap, and it draws the idea's own scene titles
            key = f"preview-{idea.index}"
        else:
            key = json.dumps([s.engine, s.comfyui.model_dump(mode="json"),
                              s.video.start_images], sort_keys=True)
        if key not in self._engines:
            self._engines[key] = make_engine(s, idea.plan)
        return self._engines[key]

    @contextlib.contextmanager
    def gpu(self, settings: Settings, engine: VideoEngine, out_dir: Path,
            llm: LLMControl | None) -> Iterator[GpuSession]:
        with gpu_slot(settings, engine), gpu_session(settings, engine, out_dir / "night",
                                                     llm) as session:
            yield session

    def assemble(self, idea: Idea, records: list[dict[str, Any]], run_info: dict[str, Any],
                 gpu: GpuSession | None) -> str:
        folder = idea.folder
        assert idea.plan is not None
        with claimed(folder.root / ".assemble.claim"):
            if _assembled(folder, records):
                log.info("%s: already assembled (%s)", idea.label, folder.final_path)
                return str(folder.final_path)
            plot = gpu.sampler.timeline.plot(folder.root / "vram-timeline.png",
                                             title=f"VRAM of the night: {folder.root.name}") \
                if gpu is not None else None
            final = assemble_video(folder, idea.plan, records, run_info, idea.settings.video)
            write_report(folder.root, idea.plan, records, run_info, plot,
                         media_url=idea.settings.ui.media_url,
                         slug=run_slug(idea.text, folder.spec.run_name, folder.spec.key))
        return str(final)

    def progress(self, text: str, share: float) -> None:
        """Progress a person reads in the Prefect UI (one artifact for the night)."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._progress is None:
            self._progress = cast(UUID, create_progress_artifact(
                100.0 * share, key="night-progress", description=text))
        else:
            update_progress_artifact(self._progress, 100.0 * share, description=text)

    def publish_eta(self, lines: list[str], eta: NightEta) -> None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact("```\n" + "\n".join(lines) + "\n```", key="night-eta",
                                 description="predicted time of each stage and idea")

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


def _assembled(folder: RunFolder, records: list[dict[str, Any]]) -> bool:
    """final.mp4 exists and its manifest lists exactly these clips."""
    if not (folder.final_path.is_file() and folder.manifest_path.is_file()):
        return False
    try:
        shots = json.loads(folder.manifest_path.read_text()).get("shots", [])
    except ValueError:
        return False
    return [s.get("key") for s in shots] == [r.get("key") for r in records]


# -- the night -------------------------------------------------------------------------------

@dataclass
class NightOptions:
    name: str  # batch name, for the summary and ETA files
    out_dir: Path
    until: float | None = None  # epoch seconds
    dry_run: bool = False
    pack_s: float = PACK_S
    workers: int = 1  # workers sharing the night (flows/fanout.py)


@dataclass
class Night:
    ideas: list[Idea]
    env: NightEnv
    opts: NightOptions
    summary: dict[str, list[dict[str, Any]]]
    tm: TimeModel = field(default_factory=TimeModel)
    profiles: dict[int, EngineProfile] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    loads: int = 0
    start: float = 0.0
    eta: NightEta | None = None
    scene_no: dict[tuple[int, int], int] = field(default_factory=dict)
    session: LLMSession | None = None
    eta_text: list[str] = field(default_factory=list)
    starts: dict[int, StartImages] = field(default_factory=dict)

    # -- helpers -----------------------------------------------------------------------------
    def _add(self, stage: str, seconds: float) -> None:
        self.measured[stage] = self.measured.get(stage, 0.0) + seconds

    def _active(self) -> list[Idea]:
        return [i for i in self.ideas if i.status in ("pending", "planned")]

    def _fingerprints(self) -> dict[int, str]:
        return {i.index: self.env.engine(i).fingerprint() for i in self.ideas
                if i.plan is not None}

    def _starts(self, idea: Idea) -> StartImages:
        """The idea's start images (made once its plan exists)."""
        assert idea.plan is not None
        if idea.index not in self.starts:
            self.starts[idea.index] = for_run(idea.settings.video.start_images, idea.plan,
                                              idea.folder, self.env.engine(idea), idea.user)
        return self.starts[idea.index]

    def _prepared(self, idea: Idea, shot: Shot, strict: bool = False) -> Shot | None:
        return self._starts(idea).prepared(shot, strict=strict)

    def _quiet_prepared(self, idea: Idea, shot: Shot) -> Shot | None:
        try:
            return self._prepared(idea, shot)
        except InputError:  # a bad user image fails its idea when its shot is rendered
            return None

    def _show_progress(self) -> None:
        live = [i for i in self.ideas if i.status != "left"]
        planned = sum(i.plan is not None for i in live)
        shots = sum(len(i.plan.shots) for i in live if i.plan is not None)
        rendered = sum(len(i.records) for i in live)
        assembled = sum(i.status == "done" for i in live)
        n = len(live) or 1
        share = (planned / n + (rendered / shots if shots else 0.0) + assembled / n) / 3
        self.env.progress(f"ideas planned {planned}/{len(live)}, shots rendered "
                          f"{rendered}/{shots}, videos assembled {assembled}/{len(live)}",
                          share)

    def fail(self, idea: Idea, err: BaseException) -> None:
        idea.status, idea.reason = "failed", f"{type(err).__name__}: {err}"
        log.error("%s failed: %s", idea.label, idea.reason)

    # -- 1. ETA ------------------------------------------------------------------------------
    def predict(self, label: str) -> NightEta:
        plans = idea_plans(self._active(), self.profiles, self._fingerprints(),
                           self._quiet_prepared)
        server_starts = bool(self.ideas) and llm_server(self.ideas[0].settings.llm) is not None
        tm = self.tm if server_starts else _no_llm_load(self.tm)
        now = self.env.clock()
        chosen = plans
        gpu_plans = [p for p in plans if p.profile.gpu and p.items]
        n_before, n_after = llm_moves(self.ideas[0].settings, gpu_plans[0].items[0]) \
            if gpu_plans else (0, 0)
        moves = (n_before * self.tm.llm_load_seconds(), n_after * self.tm.llm_load_seconds())
        if self.opts.until is None:
            eta = predict(plans, tm, self.opts.pack_s, moves)
        else:
            chosen, eta = fit_window(plans, tm, self.opts.until - now, self.opts.pack_s,
                                     moves)
            for idea in self.ideas:
                if idea.index in eta.left:
                    idea.status = "left"
        lines = [f"{label}:", *eta_lines(eta, now, self.opts.until)]
        self.eta_text = lines
        for line in lines:
            log.info(line)
        if not chosen and plans and self.opts.until is not None:
            raise NightDoesNotFit(
                f"the batch cannot fit the window: its first idea alone needs "
                f"{_hm(eta.total_s)}, the window until "
                f"{datetime.fromtimestamp(self.opts.until):%H:%M} is "
                f"{_hm(max(0.0, eta.window_s or 0.0))}: {_hm(eta.short_by_s)} short", lines)
        if not self.opts.dry_run:
            with contextlib.suppress(Exception):  # the UI is a view; it never stops a night
                self.env.publish_eta(lines, eta)
        return eta

    # -- 2. plan -----------------------------------------------------------------------------
    def plan_all(self) -> None:
        todo = [i for i in self._active() if i.plan is None]
        if not todo:
            return
        session: LLMSession | None = None
        t0 = self.env.clock()
        try:
            session = self.env.open_llm(todo[0].settings, self.opts.out_dir)
        except Exception as err:  # no LLM: no idea can be planned tonight
            for idea in todo:
                self.fail(idea, err)
            return
        self._add("llm_load", self.env.clock() - t0)
        self.tm.refine("llm_load", self.tm.llm_load_seconds(), session.load_s)
        try:
            for wait in (False, True):  # first skip plans another worker holds, then wait
                for idea in todo:
                    if idea.plan is None and idea.status == "pending":
                        self._plan_one(idea, session.backend, wait)
        finally:
            session.after_planning()
            self.session = session

    def _plan_one(self, idea: Idea, backend: LLMBackend, wait: bool) -> None:
        if self.opts.until is not None and \
                self.env.clock() + self.tm.plan_seconds() > self.opts.until:
            idea.status = "left"
            return
        lock = idea.folder.root / ".plan.claim"
        if not wait and not claim(lock):
            log.info("%s: being planned by another worker; moving on", idea.label)
            return
        t0 = self.env.clock()
        try:
            with claimed(lock) if wait else contextlib.nullcontext():
                idea.plan = _load_plan(idea.folder)
                if idea.plan is None:
                    idea.llm = getattr(backend, "description", "llm")
                    story = write_story(backend, idea.folder, idea.settings.llm.temperature)
                    idea.plan = plan_shots(backend, idea.folder, story, idea.settings.llm,
                                           idea.settings.video)
                    took = self.env.clock() - t0
                    self._add("plan", took)
                    self.tm.refine("plan", self.tm.plan_seconds(), took)
            idea.status = "planned"
        except DiskFull:
            raise
        except Exception as err:  # one idea's plan fails, the others go on
            self.fail(idea, err)
        finally:
            if not wait:
                release(lock)
        self._show_progress()

    # -- 3. render ---------------------------------------------------------------------------
    def render_all(self) -> None:
        live = [i for i in self._active() if i.plan is not None]
        for idea in live:
            idea.status, idea.started_at = "planned", idea.started_at or self.env.clock()
        plans = idea_plans(live, self.profiles, self._fingerprints(), self._quiet_prepared)
        by_profile: dict[EngineProfile, list[Idea]] = {}
        for idea in live:
            by_profile.setdefault(self.profiles[idea.index], []).append(idea)
        groups = plan_groups(plans, self.tm, self.opts.pack_s)
        # ideas with every shot already rendered are assembled before any GPU work
        for idea in live:
            if not any(it.idea == idea.index for _p, g in groups for it in g.items):
                self._collect(idea)
        placed: Broker | None = None  # the broker that moved the LLM, once for the night
        try:
            for profile, ideas in by_profile.items():
                mine = [g for p, g in groups if p == profile]
                engine = self.env.engine(ideas[0])
                llm = self.session.control(ideas[0].settings) if self.session else None
                with self.env.gpu(ideas[0].settings, engine, self.opts.out_dir, llm) as gpu:
                    if gpu.broker is not None and placed is None and mine:
                        first = mine[0].items[0]
                        t0 = self.env.clock()
                        gpu.broker.place_llm_for_video(gpu.broker.plan(
                            first.frames, first.width, first.height, first.shot_id))
                        self._add("llm_moves", self.env.clock() - t0)
                        placed = gpu.broker
                    self._keyframes(ideas, gpu)
                    self._render_groups(profile, mine, gpu)
        finally:
            if placed is not None and placed.llm is not None and placed.llm.outlives_night:
                t0 = self.env.clock()
                placed.restore_llm()
                self._add("llm_moves", self.env.clock() - t0)

    def _keyframes(self, ideas: list[Idea], gpu: GpuSession) -> None:
        """Every keyframe of these ideas before any of their clips: the keyframe model loads
        once, and is unloaded (if the broker says so) only after the last idea's."""
        wanted = []
        for idea in ideas:
            if idea.status != "planned":
                continue
            try:
                starts = self._starts(idea)
                starts.check()  # a missing user image fails this idea, now
            except Exception as err:
                self.fail(idea, err)
                continue
            if starts.keyframe_shots():
                wanted.append((idea, starts))
        for n, (idea, starts) in enumerate(wanted):
            fresh: list[tuple[int, int, int]] = []
            t0 = self.env.clock()
            try:
                fresh = [(1, s.width, s.height) for s in starts.keyframe_shots()
                         if not starts.keyframe_path(s).exists()]
                render_keyframes(self.env.engine(idea), starts, gpu.broker,
                                 label=idea.folder.root.name, last=n == len(wanted) - 1)
            except DiskFull:
                raise
            except Exception as err:  # this idea fails; the others go on
                self.fail(idea, err)
                fresh = []
            took = self.env.clock() - t0
            self._add("keyframes", took)
            if fresh:  # the ETA's keyframe stage learns from what this machine took
                self.tm.refine("keyframes", self.tm.keyframe_seconds(
                    self.profiles[idea.index], fresh), took)

    def _render_groups(self, profile: EngineProfile, groups: list[Group],
                       gpu: GpuSession) -> None:
        deferred: list[WorkItem] = []
        stopped = False
        for g in groups:
            todo = [it for it in g.items if self._idea(it).status == "planned"]
            if not todo:
                continue
            predicted = group_seconds(self.tm, profile, todo)
            if self.opts.until is not None and self.env.clock() + predicted > self.opts.until:
                stopped = True
                break
            t0 = self.env.clock()
            fresh = []
            for share in self._shares(todo, g.pass_major, groups[groups.index(g):], deferred):
                fresh += self._render_group(share, g.pass_major and len(share) > 1, gpu,
                                            deferred)
            took = self.env.clock() - t0
            self._add("render", took)
            if fresh:
                self.loads += 1 if profile.gpu else 0
                fresh_pred = group_seconds(self.tm, profile, fresh)
                self.tm.refine("render" if profile.gpu else "preview", fresh_pred, took)
            for idea in dict.fromkeys(self._idea(it) for it in todo):
                self._collect(idea, gpu)
        if stopped:  # the window would be overrun: no new shots tonight
            for idea in {self._idea(it) for g in groups for it in g.items}:
                if idea.status == "planned" and len(idea.records) < len(_shots(idea)):
                    idea.status = "left"
                    log.warning("%s: left for the next night (%d of %d shots done): the "
                                "window would be overrun", idea.label, len(idea.records),
                                len(_shots(idea)))
        for it in deferred:  # shots other workers held: wait for them now
            idea = self._idea(it)
            if idea.status == "planned":
                self._render_item(it, gpu, wait=True)
                self._collect(idea, gpu)

    def _shares(self, todo: list[WorkItem], pass_major: bool, rest: list[Group],
                deferred: list[WorkItem]) -> Iterator[list[WorkItem]]:
        """The parts of a group this worker takes, one after the other. Alone, or a group
        rendered clip by clip (claimed shot by shot anyway): the group.
        With N workers sharing the night (guided self-scheduling): at most ceil(R/N) of the
        R shots from here on that nobody has taken, so the night's last groups are split
        between the workers instead of one rendering a whole group while the others wait;
        then the rest (rendered or held by others: resumed, or left to them)."""
        if self.opts.workers <= 1 or not pass_major:
            yield todo
            return

        def free(items: Sequence[WorkItem]) -> list[WorkItem]:
            return [it for it in items
                    if self._idea(it).status == "planned" and not self._taken(it)]

        while mine := free(todo):
            left = sum(len(free(g.items)) for g in rest)
            yield mine[:max(1, -(-left // self.opts.workers))]
        rest_of_group = [it for it in todo if it not in deferred and self._idea(it).status ==
                         "planned" and it.shot_id not in self._idea(it).records]
        if rest_of_group:
            yield rest_of_group

    def _taken(self, it: WorkItem) -> bool:
        idea = self._idea(it)
        return taken(self.env.engine(idea), _shot(idea, it.shot_id), idea.folder)

    def _idea(self, it: WorkItem) -> Idea:
        return self.ideas[it.idea]

    def _render_group(self, items: list[WorkItem], pass_major: bool, gpu: GpuSession,
                      deferred: list[WorkItem]) -> list[WorkItem]:
        """Render a group; returns the items rendered now (not resumed, not deferred)."""
        if pass_major:
            engine = self.env.engine(self._idea(items[0]))
            pairs = [(s, self._idea(it).folder) for it in items
                     if self._idea(it).status == "planned"
                     and (s := self._quiet_prepared(self._idea(it),
                                                    _shot(self._idea(it), it.shot_id)))]
            gpu.sampler.timeline.mark(f"pass-major group of {len(items)}")
            try:
                render_group_pass_major(engine, pairs)
            except DiskFull:
                raise
            except Exception as err:  # the group's ideas fail; the rest of the night goes on
                for idea in dict.fromkeys(self._idea(it) for it in items):
                    self.fail(idea, err)
                return []
        fresh = []
        for it in items:
            if self._idea(it).status != "planned":
                continue
            record = self._render_item(it, gpu, wait=False)
            if record is None:
                deferred.append(it)
            elif not record.get("resumed") or pass_major:
                fresh.append(it)
        if pass_major and fresh:  # the broker's between-shots care, once for the group
            last = fresh[-1]
            self._after_shot(self._idea(last), _shot(self._idea(last), last.shot_id))
        return fresh

    def _after_shot(self, idea: Idea, shot: Shot) -> None:
        # A night-wide scene number, so the broker's restart-every-N-scenes counts scenes
        # of every idea, not scene indexes that repeat from idea to idea.
        n = self.scene_no.setdefault((idea.index, shot.scene_index), len(self.scene_no))
        self.env.engine(idea).after_shot(shot.model_copy(update={"scene_index": n}))

    def _render_item(self, it: WorkItem, gpu: GpuSession, wait: bool) -> dict[str, Any] | None:
        idea = self._idea(it)
        engine = self.env.engine(idea)
        try:
            shot = self._prepared(idea, _shot(idea, it.shot_id), strict=wait)
            if shot is None:  # what it starts from is held by another worker
                return None
            gpu.sampler.timeline.mark(f"{idea.index}/{shot.id}")
            record = render_shot(engine, shot, idea.folder, wait_for_others=wait)
        except DiskFull:
            raise
        except Exception as err:  # this idea fails; the others go on
            self.fail(idea, err)
            return None
        if record is None:
            return None
        idea.records[shot.id] = record
        if not record.get("resumed"):
            self._after_shot(idea, shot)
        self._show_progress()
        return record

    def _collect(self, idea: Idea, gpu: GpuSession | None = None) -> None:
        """Assemble the idea once every shot has its record (resumed ones included)."""
        if idea.status != "planned" or idea.plan is None:
            return
        engine = self.env.engine(idea)
        for shot in idea.plan.shots:
            if shot.id not in idea.records:
                s = self._quiet_prepared(idea, shot)
                if s is None:
                    return
                key = idea.folder.shot_key(s, engine.fingerprint())
                done = idea.folder.finished_record(s, key)
                if done is None:
                    return
                idea.records[s.id] = {**done, "resumed": True}
        records = [idea.records[s.id] for s in idea.plan.shots]
        run_info = {"idea": idea.text, "scenes": idea.folder.spec.scenes,
                    "target_seconds": idea.folder.spec.target_seconds,
                    "style": idea.folder.spec.style, "engine": idea.settings.engine,
                    "preview": engine.name == "preview", "llm": idea.llm,
                    "started_at": idea.started_at,
                    "broker_events": [e.to_json() for e in gpu.broker.events]
                    if gpu is not None and gpu.broker is not None else []}
        t0 = self.env.clock()
        try:
            idea.final = self.env.assemble(idea, records, run_info, gpu)
        except Exception as err:
            self.fail(idea, err)
            return
        took = self.env.clock() - t0
        self._add("assemble", took)
        self.tm.refine("assemble", self.tm.assemble_seconds(sum(r["frames"] for r in records)),
                       took)
        idea.status = "done"
        log.info("%s: video assembled: %s", idea.label, idea.final)
        self._show_progress()

    # -- the whole night ---------------------------------------------------------------------
    def run(self) -> NightEta:
        self.start = self.env.clock()
        self.profiles = {i.index: engine_profile(i.settings) for i in self.ideas}
        self.eta = self.predict("ETA at the start of the night")
        if self.opts.dry_run:
            return self.eta
        for idea in self._active():
            try:
                idea.folder.prepare()  # writable, enough disk; partial files swept
            except InputError as err:
                self.fail(idea, err)
        try:
            self.plan_all()
            if any(i.status == "planned" for i in self.ideas):
                self.predict("ETA after planning")
            self.render_all()
        except DiskFull as err:
            log.error("batch stopped: %s", err)
            for idea in self._active():
                self.fail(idea, err)
        finally:
            if self.session is not None:
                self.session.close()
        return self.eta

    def report(self) -> dict[str, Any]:
        """Predicted against measured, per stage, and the ETA's error."""
        assert self.eta is not None
        total = self.env.clock() - self.start
        pred = {**self.eta.stages, "total": self.eta.total_s}
        meas = {**{k: round(self.measured.get(k, 0.0), 1) for k in self.eta.stages},
                "total": round(total, 1)}
        err = (self.eta.total_s - total) / total if total > 0 else 0.0
        return {"predicted_s": pred, "measured_s": meas, "eta_error": round(err, 4),
                "render_groups_predicted": self.eta.groups, "model_load_sets": self.loads,
                "time_model_scale": dict(self.tm.scale)}


def _shots(idea: Idea) -> list[Shot]:
    return idea.plan.shots if idea.plan is not None else []


def _shot(idea: Idea, shot_id: str) -> Shot:
    return next(s for s in _shots(idea) if s.id == shot_id)


def _no_llm_load(tm: TimeModel) -> TimeModel:
    """An attached LLM server is loaded already: no load in the plan phase."""
    from dataclasses import replace

    return replace(tm, llm_load_s=0.0)


def run_night(parsed: ParsedBatch, scenes: int, target_seconds: float,
              common: dict[str, Any], opts: NightOptions, env: NightEnv | None = None
              ) -> tuple[dict[str, Any], NightEta]:
    """Run (or, with dry_run, only predict) the night; returns the summary and the ETA."""
    env = env or RealNight()
    summary: dict[str, list[dict[str, Any]]] = {"done": [], "failed": [], "skipped": [],
                                                "left": []}
    ideas = read_ideas(parsed, scenes, target_seconds, common, summary)
    tm_path = opts.out_dir / TIME_MODEL_FILE
    night = Night(ideas, env, opts, summary, TimeModel.load(tm_path))
    try:
        eta = night.run()
    finally:
        env.close()
    if opts.dry_run:
        return {"eta": eta.to_json(), "eta_text": night.eta_text}, eta
    for idea in ideas:
        row: dict[str, Any] = {"where": idea.where, "idea": idea.text}
        with contextlib.suppress(AttributeError):  # the key of its report and VRAM artifacts
            spec = idea.folder.spec
            row["slug"] = run_slug(idea.text, spec.run_name, spec.key)
        if idea.status == "done":
            summary["done"].append({**row, "final": idea.final})
        elif idea.status == "left":
            summary["left"].append({**row, "shots_done": len(idea.records)})
        elif idea.status == "failed":
            summary["failed"].append({**row, "reason": idea.reason})
        else:
            summary["failed"].append({**row, "reason": "not finished (shots held by another "
                                      "worker that did not finish them)"})
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    night.tm.save(tm_path)
    result: dict[str, Any] = {**summary, "eta": eta.to_json(), "eta_text": night.eta_text,
                              "night": night.report()}
    return result, eta


def summary_path(out_dir: Path, batch: str) -> Path:
    return out_dir / f"batch-{safe_name(Path(batch).stem)}-summary.json"


def write_summary(out_dir: Path, batch: str, result: dict[str, Any]) -> Path:
    out = summary_path(out_dir, batch)
    write_json_atomic(out, result)
    return out
