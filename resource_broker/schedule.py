"""The night's order of work and its ETA. Pure: work items and the time model in, render
groups and predicted times out; the batch flow and the simulated night both run this code.

Stage by stage: every idea is planned first (the LLM loaded once), then every shot of every
idea is rendered in groups. With a two-expert engine where it pays, a group is several
ideas' shots rendered pass by pass (one set of model loads per group instead of one per
shot); groups close at idea boundaries once they hold about `pack_s` of work, so each
group ends with whole ideas that are assembled at once. A shot that starts from another
shot's last frame (`deps`) always lands in a later group than that shot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .time_model import EngineProfile, TimeModel

PACK_S = 1200.0  # a crash loses at most about this much unassembled work


@dataclass(frozen=True)
class WorkItem:
    idea: int  # position of the idea in the night
    shot_id: str
    frames: int
    width: int
    height: int
    deps: tuple[str, ...] = ()  # shot ids of the same idea that must be finished first
    keyframe: bool = False  # its start image is a keyframe, made before any clip

    @property
    def key(self) -> str:
        return f"{self.idea}/{self.shot_id}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.width, self.height)


@dataclass(frozen=True)
class Group:
    items: tuple[WorkItem, ...]
    pass_major: bool


def _topological(items: Sequence[WorkItem]) -> list[WorkItem]:
    """Items in their given order, except that a shot never comes before its deps."""
    done: set[str] = set()
    out: list[WorkItem] = []
    pending = list(items)
    known = {i.key for i in items}
    while pending:
        for n, it in enumerate(pending):
            if all(f"{it.idea}/{d}" in done or f"{it.idea}/{d}" not in known for d in it.deps):
                out.append(pending.pop(n))
                done.add(it.key)
                break
        else:
            raise ValueError(f"dependency cycle among {[i.key for i in pending]}")
    return out


def _depth(items: Sequence[WorkItem]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for it in _topological(items):
        depth[it.key] = 1 + max((depth.get(f"{it.idea}/{d}", -1) for d in it.deps),
                                default=-1)
    return depth


def render_order(items: Sequence[WorkItem], *, pass_major: bool,
                 seconds: Callable[[list[WorkItem]], float],
                 pack_s: float = PACK_S) -> list[Group]:
    """Groups in the order to render them. Clip by clip: one shot a group, idea by idea.
    Pass-major: ideas packed until a pack holds `pack_s` of work, then each dependency
    layer of the pack is one group."""
    ordered = _topological(items)
    if not pass_major:
        return [Group((it,), False) for it in ordered]
    depth = _depth(ordered)
    packs: list[list[WorkItem]] = []
    for idea in dict.fromkeys(it.idea for it in ordered):
        mine = [it for it in ordered if it.idea == idea]
        if not packs or seconds(packs[-1]) >= pack_s:
            packs.append([])
        packs[-1].extend(mine)
    groups = []
    for pack in packs:
        for layer in sorted({depth[it.key] for it in pack}):
            members = tuple(it for it in pack if depth[it.key] == layer)
            groups.append(Group(members, len(members) > 1))
    return groups


# -- the ETA ---------------------------------------------------------------------------------

@dataclass
class IdeaPlan:
    """One idea as the ETA sees it: its shots (planned, or estimated from its parameters)."""

    index: int
    label: str
    profile: EngineProfile
    items: list[WorkItem]
    needs_plan: bool
    estimated: bool = False  # shots estimated before the LLM planned them
    done_items: set[str] = field(default_factory=set)  # shot keys already rendered

    @property
    def frames(self) -> int:
        return sum(it.frames for it in self.items)


@dataclass
class IdeaEta:
    index: int
    label: str
    shots: int
    plan_s: float
    render_s: float
    assemble_s: float
    finish_s: float  # seconds after the night's start
    estimated: bool


@dataclass
class NightEta:
    stages: dict[str, float]  # llm_load, plan, render (loads included), assemble
    ideas: list[IdeaEta]
    total_s: float
    loads: int  # sets of model loads in the render phase
    groups: int
    left: list[int] = field(default_factory=list)  # ideas left for the next night
    window_s: float | None = None

    @property
    def short_by_s(self) -> float:
        return 0.0 if self.window_s is None else max(0.0, self.total_s - self.window_s)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["short_by_s"] = self.short_by_s
        return d


def group_seconds(tm: TimeModel, profile: EngineProfile, g: Sequence[WorkItem],
                  done: Collection[str] = ()) -> float:
    todo = [it.shape for it in g if it.key not in done]
    return sum(tm.group_seconds(profile, todo).values()) if todo else 0.0


def plan_groups(ideas: Sequence[IdeaPlan], tm: TimeModel, pack_s: float = PACK_S
                ) -> list[tuple[EngineProfile, Group]]:
    """The render groups of the whole night: per engine profile (in order of first use),
    pass-major where the time model says it pays."""
    out: list[tuple[EngineProfile, Group]] = []
    for profile in dict.fromkeys(i.profile for i in ideas):
        mine = [i for i in ideas if i.profile == profile]
        items = [it for i in mine for it in i.items if it.key not in i.done_items]
        done: set[str] = set().union(*(i.done_items for i in mine))
        pm = tm.pass_major_pays(profile, len(items))

        def seconds(g: list[WorkItem], p: EngineProfile = profile,
                    d: set[str] = done) -> float:
            return group_seconds(tm, p, g, d)

        for g in render_order(items, pass_major=pm, pack_s=pack_s, seconds=seconds):
            out.append((profile, g))
    return out


def keyframe_seconds(ideas: Sequence[IdeaPlan], tm: TimeModel) -> float:
    """The keyframes still to make, before any clip: one set of loads per engine, then a
    one-frame render each (of shots not finished yet)."""
    total = 0.0
    for profile in dict.fromkeys(i.profile for i in ideas):
        shapes = [(1, it.width, it.height) for i in ideas if i.profile == profile
                  for it in i.items if it.keyframe and it.key not in i.done_items]
        total += tm.keyframe_seconds(profile, shapes)
    return total


def predict(ideas: Sequence[IdeaPlan], tm: TimeModel, pack_s: float = PACK_S,
            llm_moves: tuple[float, float] = (0.0, 0.0)) -> NightEta:
    """The night in the order the batch runs it: plan every idea that needs it (one LLM
    load), move the LLM (`llm_moves`: seconds of LLM loads before and after the render
    phase, as the broker will decide), make every keyframe, render the groups, assemble
    each idea right after its last shot."""
    planning = [i for i in ideas if i.needs_plan]
    llm_load = tm.llm_load_seconds() if planning else 0.0
    plan_each = tm.plan_seconds()
    gpu_work = any(i.profile.gpu for i in ideas)
    before, after = llm_moves if gpu_work else (0.0, 0.0)
    keyframes = keyframe_seconds(ideas, tm)
    t = llm_load + plan_each * len(planning) + before + keyframes
    left = {i.index: len([it for it in i.items if it.key not in i.done_items]) for i in ideas}
    render = {i.index: 0.0 for i in ideas}
    finish = {i.index: t for i in ideas}
    assemble_total = 0.0
    groups = plan_groups(ideas, tm, pack_s)
    by_index = {i.index: i for i in ideas}
    loads = 0
    for idea in ideas:  # nothing left to render: assembled before the render phase
        if left[idea.index] == 0:
            a = tm.assemble_seconds(idea.frames)
            t += a
            assemble_total += a
            finish[idea.index] = t
    for profile, g in groups:
        dt = group_seconds(tm, profile, g.items)
        loads += 1 if profile.gpu else 0
        t += dt
        shots = len(g.items)
        for it in g.items:
            render[it.idea] += dt / shots
            left[it.idea] -= 1
        for idea_index in dict.fromkeys(it.idea for it in g.items):
            if left[idea_index] == 0:
                a = tm.assemble_seconds(by_index[idea_index].frames)
                t += a
                assemble_total += a
                finish[idea_index] = t
    t += after
    rows = [IdeaEta(i.index, i.label, len(i.items), plan_each if i.needs_plan else 0.0,
                    round(render[i.index], 1), round(tm.assemble_seconds(i.frames), 1),
                    round(finish[i.index], 1), i.estimated) for i in ideas]
    stages = {"llm_load": round(llm_load, 1), "plan": round(plan_each * len(planning), 1),
              "llm_moves": round(before + after, 1), "keyframes": round(keyframes, 1),
              "render": round(sum(render.values()), 1),
              "assemble": round(assemble_total, 1)}
    if not keyframes:  # a night without keyframes does not list the stage
        del stages["keyframes"]
    return NightEta(stages, rows, round(t, 1), loads, len(groups))


def fit_window(ideas: Sequence[IdeaPlan], tm: TimeModel, window_s: float,
               pack_s: float = PACK_S, llm_moves: tuple[float, float] = (0.0, 0.0)
               ) -> tuple[list[IdeaPlan], NightEta]:
    """The ideas that fit the window, in batch order (a later, smaller idea may take the
    place of one that does not fit); the ETA of those, with the rest listed as left."""
    chosen: list[IdeaPlan] = []
    for idea in ideas:
        if predict([*chosen, idea], tm, pack_s, llm_moves).total_s <= window_s:
            chosen.append(idea)
    eta = predict(chosen or list(ideas)[:1], tm, pack_s, llm_moves)
    eta.left = [i.index for i in ideas if i not in chosen]
    eta.window_s = window_s
    if not chosen:  # nothing fits: say by how much the first idea alone overruns
        eta.ideas = eta.ideas[:0]
    return chosen, eta
