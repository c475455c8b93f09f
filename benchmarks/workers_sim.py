"""A simulated overnight batch over 1, 2 and 4 GPU workers, on the night's own code.

Each worker runs what a `night-shard` run runs (`flows.night.run_night` over the same batch
and the same output folder, with the group size the fan-out gives a shard), in its own thread
with its own simulated GPU, ComfyUI and LLM from `benchmarks/night_sim.py` (times from
shared/ANCHORS.md). The workers share only the run folders, so the real claims decide who
plans, renders and assembles what. Each worker has its own virtual clock; a conservative
discrete-event baton lets only the worker with the earliest clock run, so the interleaving
is the one of a real night (waiting for another worker's claim is virtual time too).

It prints, per worker count, the night's total time (the last worker's clock) and its ratio
to one worker against 1/N, and the orchestration time per shot: the real wall time the
render phase took per shot with an engine that takes no real time (Prefect task runs on a
local temporary server, claims, records), which is what Prefect and the claims add.

    python benchmarks/workers_sim.py --ideas 20 --workers 1 2 4 --steps 2+2 20+20 \\
        --out benchmarks/results/workers-sim.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
import types
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.night_sim import (  # noqa: E402
    SimLLM,
    SimLLMSession,
    SimNight,
    Truth,
    World,
    batch_of,
    sim_settings,
)
from flows.night import NightOptions, run_night  # noqa: E402
from resource_broker.schedule import PACK_S  # noqa: E402


class Baton:
    """Only the worker whose virtual clock is earliest runs; the others wait."""

    def __init__(self, names: list[str]) -> None:
        self.cv = threading.Condition()
        self.times = {n: 0.0 for n in names}
        self.running: str | None = None

    def _turn(self, me: str) -> bool:
        return self.running is None and min(self.times, key=lambda k: (self.times[k], k)) == me

    def wait_turn(self, me: str, t: float) -> None:
        with self.cv:
            self.times[me] = t
            if self.running == me:
                self.running = None
            self.cv.notify_all()
            self.cv.wait_for(lambda: self._turn(me))
            self.running = me

    def leave(self, me: str) -> None:
        with self.cv:
            del self.times[me]
            self.running = None
            self.cv.notify_all()


_local = threading.local()


class SameShotsLLM(SimLLM):
    """The simulated LLM, but an idea gets the same number of shots whichever worker plans
    it (its story names the idea; the scenes are drawn from the idea), so that every worker
    count renders the same shots."""

    def complete(self, messages: Any, **kw: Any) -> Any:
        done = super().complete(messages, **kw)
        found = _IDEA.search(" ".join(m["content"] for m in messages))
        return replace(done, text=f"{done.text} ({found.group()})") if found else done

    def complete_json(self, messages: Any, schema: dict[str, Any], **kw: Any) -> Any:
        found = _IDEA.search(" ".join(m["content"] for m in messages))
        if "scenes" not in schema.get("properties", {}) or found is None:
            return super().complete_json(messages, schema, **kw)
        rng, self.w.rng = self.w.rng, random.Random(zlib.crc32(found.group().encode()))
        try:
            return super().complete_json(messages, schema, **kw)
        finally:
            self.w.rng = rng


_IDEA = re.compile(r"idea \d+:")


class ShardNight(SimNight):
    def open_llm(self, settings: Any, log_dir: Path) -> SimLLMSession:
        session = super().open_llm(settings, log_dir)
        session.backend = SameShotsLLM(self.w)
        return session


class SyncWorld(World):
    """A worker's world whose clock passes only with the baton."""

    baton: Baton
    name: str

    def spend(self, seconds: float, what: str, busy: bool) -> None:
        super().spend(seconds, what, busy)
        self.baton.wait_turn(self.name, self.t)


def _sleep(seconds: float) -> None:
    world = getattr(_local, "world", None)
    if world is None:  # not a simulated worker (e.g. the claims' lease refresher)
        time.sleep(seconds)
    else:
        world.spend(seconds, "wait for another worker", busy=False)


def _virtual_waits() -> None:
    """The night's waits for other workers' claims pass virtual time, not real time."""
    import story_to_video.locks
    import tasks.render

    proxy = types.SimpleNamespace(sleep=_sleep, time=time.time, monotonic=time.monotonic)
    story_to_video.locks.time = proxy  # type: ignore[assignment]
    tasks.render.time = proxy  # type: ignore[assignment]


def run_workers(n_ideas: int, n_workers: int, out: Path, seed: int = 7,
                steps: tuple[int, int] = (2, 2)) -> dict[str, Any]:
    from prefect import flow

    names = [f"w{i}" for i in range(n_workers)]
    baton = Baton(names)
    parsed = batch_of(n_ideas)
    pack_s = PACK_S if n_workers == 1 else PACK_S / (2 * n_workers)
    results: dict[str, dict[str, Any]] = {}
    worlds: dict[str, SyncWorld] = {}
    render_wall: dict[str, float] = {}
    errors: list[BaseException] = []

    @flow(name="night-shard-sim")
    def shard(name: str) -> None:
        world = worlds[name]
        _local.world = world
        baton.wait_turn(name, 0.0)
        try:
            env = ShardNight(world)
            t_real = time.perf_counter()
            result, _eta = run_night(parsed, 3, 12.0, sim_settings(out, world.truth),
                                     NightOptions(name="sim", out_dir=out, pack_s=pack_s,
                                                  workers=n_workers),
                                     env)
            render_wall[name] = time.perf_counter() - t_real
            results[name] = result
        finally:
            baton.leave(name)

    def thread(name: str) -> None:
        try:
            shard(name)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    for i, name in enumerate(names):
        w = SyncWorld(rng=random.Random(seed + i), truth=Truth(steps=steps))
        w.baton, w.name = baton, name
        worlds[name] = w
    threads = [threading.Thread(target=thread, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    shots = len(list(out.glob("*/clips/*.json")))
    samples = {n: sum(1 for s in w.spans if s.what == "sample") for n, w in worlds.items()}
    done = {d["where"] for r in results.values() for d in r["done"]}
    return {"ideas": n_ideas, "steps": "+".join(map(str, steps)), "workers": n_workers,
            "videos": len(done), "shots": shots,
            "total_s": round(max(w.t for w in worlds.values()), 1),
            "worker_s": {n: round(w.t, 1) for n, w in worlds.items()},
            "sampling_steps": samples,
            "waiting_s": {n: round(sum(s.end - s.start for s in w.spans
                                       if s.what == "wait for another worker"), 1)
                          for n, w in worlds.items()},
            "llm_loads": sum(w.loads.get("llm", 0) for w in worlds.values()),
            "wall_s": round(max(render_wall.values()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ideas", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", nargs="+", default=["2+2"],
                    help="sampling steps high+low, one night per value (2+2: the 4-step "
                    "LoRA; 20+20: without it)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    from prefect.logging import disable_run_logger

    _virtual_waits()
    rows = []
    with disable_run_logger():
        for spec in args.steps:
            hi, lo = (int(x) for x in spec.split("+"))
            for n in args.workers:
                with tempfile.TemporaryDirectory() as tmp:
                    row = run_workers(args.ideas, n, Path(tmp), steps=(hi, lo))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\nsteps  workers  videos  total s  vs 1 worker  ideal 1/N  off ideal  wall s per shot")
    for r in rows:
        one = next(o for o in rows if o["workers"] == 1 and o["steps"] == r["steps"])
        ratio = r["total_s"] / one["total_s"]
        r["ratio"] = round(ratio, 3)
        r["off_ideal"] = round(ratio * r["workers"] - 1, 3)
        r["wall_s_per_shot"] = round(r["wall_s"] / max(r["shots"], 1), 3)
        print(f"{r['steps']:>5}  {r['workers']:7}  {r['videos']:6}  {r['total_s']:7.0f}  "
              f"{ratio:11.3f}  {1 / r['workers']:9.3f}  {100 * r['off_ideal']:+8.1f}%  "
              f"{r['wall_s_per_shot']:15.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
