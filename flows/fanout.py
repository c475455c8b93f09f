"""The overnight batch over every GPU worker of the pool: one parent run, one shard a worker.

1. The parent (`story-to-video` with `fan_out`, the `overnight` deployment) writes the
   night's manifest into the shared output folder (`.night/<night>.json`: the ideas, their
   parameters, the folder as the parent sees it) and starts one child run of the
   deployment `night-shard/overnight` on the queue of every GPU worker polling the pool
   (`story-to-video worker` polls a queue named after itself besides the default one).
2. Each shard runs the whole night (`flows/night.py`) over the same ideas, on its worker's
   GPU, ComfyUI and LLM: plans, shots and assemblies are claimed in the shared folder, so
   nothing is done twice, and what a lost worker held is taken over by the others (its
   claims go stale: its pid is gone, or it stopped refreshing them).
3. The parent waits, marks a shard whose worker was lost as Crashed (its lease in the
   shared folder went stale), cancels shards that never started once the night's work is
   done, runs the night itself if no shard finished it, and merges the shards' results into
   the night's summary, which says which worker and GPU made each video.

Without any GPU worker queue (a plain `prefect worker start`) the parent runs the night.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger

from flows.night import NightOptions, run_night
from resource_broker.schedule import PACK_S
from story_to_video.atomic import write_json_atomic
from story_to_video.batch import BatchEntry, ParsedBatch
from story_to_video.locks import claim, is_stale, release
from story_to_video.run import InputError
from story_to_video.worker import made_by

log = logging.getLogger("story_to_video.fanout")
NIGHT_DIR = ".night"
SHARD_DEPLOYMENT = "night-shard/overnight"
QUEUE_FRESH_S = 60.0  # a queue polled this recently has a live worker


def manifest_path(out_dir: Path, night: str) -> Path:
    return out_dir / NIGHT_DIR / f"{night}.json"


def write_manifest(out_dir: Path, night: str, parsed: ParsedBatch, scenes: int,
                   target_seconds: float, common: dict[str, Any], until: float | None) -> Path:
    """What every shard needs, in the shared folder: also the proof that a host sees it."""
    path = manifest_path(out_dir, night)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "night": night, "output_dir": str(out_dir.resolve()), "host": socket.gethostname(),
        "entries": [{"where": w, **e.model_dump(exclude_none=True)} for w, e in parsed.entries],
        "problems": [{"where": p.where, "reason": p.reason} for p in parsed.problems],
        "scenes": scenes, "target_seconds": target_seconds, "until": until,
        "common": {k: v for k, v in common.items() if k != "output_dir"}})
    return path


def read_manifest(out_dir: Path, night: str, parent_dir: str) -> dict[str, Any]:
    """The night's manifest as this host sees it; refuses a folder that is not the shared one
    (before any work), naming both folders."""
    path = manifest_path(out_dir, night)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("night") != night:
        raise InputError(
            f"the output folder {out_dir.resolve()} on {socket.gethostname()} is not the "
            f"night's shared output folder {parent_dir} (where the overnight run wrote "
            f"{NIGHT_DIR}/{night}.json): mount the shared folder there, or point "
            "STV_OUTPUT_DIR of this worker at it; nothing was rendered")
    return data


def _parsed(data: dict[str, Any]) -> ParsedBatch:
    from story_to_video.batch import BatchProblem

    entries = [(e.pop("where"), BatchEntry(**e)) for e in (dict(x) for x in data["entries"])]
    return ParsedBatch(entries, [BatchProblem(p["where"], p["reason"])
                                 for p in data.get("problems", [])])


def _shard_name() -> str:
    return f"night shard on {made_by()['worker']}"


@flow(name="night-shard", flow_run_name=_shard_name)
def night_shard(night: str, output_dir: str, pack_s: float = PACK_S, workers: int = 1) -> str:
    """One worker's part of an overnight batch: the whole night over the shared folder,
    taking whatever no other worker holds. Returns the path of its result."""
    from prefect.runtime import flow_run

    from flows.pipeline import _send_library_logs_to_prefect

    _send_library_logs_to_prefect()
    out = Path(os.environ.get("STV_OUTPUT_DIR") or output_dir)
    data = read_manifest(out, night, output_dir)
    me = made_by()
    get_run_logger().info("night %s: worker %s, host %s, GPU %d, output folder %s", night,
                          me["worker"], me["host"], me["gpu"], out)
    run_id = flow_run.get_id() or uuid.uuid4().hex
    alive = out / NIGHT_DIR / night / f"shard-{run_id}.alive"
    claim(alive)  # the lease the parent watches: refreshed while this process lives
    try:
        result, _eta = run_night(_parsed(data), data["scenes"], data["target_seconds"],
                                 {**data["common"], "output_dir": str(out)},
                                 NightOptions(name=night, out_dir=out, until=data["until"],
                                              pack_s=pack_s, workers=workers))
        result["made_by"] = me
        path = out / NIGHT_DIR / night / f"shard-{run_id}.json"
        write_json_atomic(path, result)
        return str(path)
    finally:
        release(alive)


# -- the parent ------------------------------------------------------------------------------

def gpu_queues(pool: str) -> list[str]:
    """The pool's queues that a worker polled within the last minute, but the default one
    (every worker polls it; the overnight run itself lands there)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        queues = client.read_work_queues(work_pool_name=pool)
    now = datetime.now(UTC)
    fresh = timedelta(seconds=QUEUE_FRESH_S)
    return sorted(q.name for q in queues if q.name != "default" and not q.is_paused
                  and q.last_polled is not None and now - q.last_polled < fresh)


def own_pool() -> str | None:
    """The work pool of this flow run (None when it does not come from a deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(run_id)).work_pool_name


def start_shards(queues: list[str], night: str, out_dir: Path) -> dict[UUID, str]:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    pack_s = PACK_S / (2 * len(queues))  # groups small enough to share between workers
    runs: dict[UUID, str] = {}
    for q in queues:
        fr = cast(FlowRun, run_deployment(SHARD_DEPLOYMENT, parameters={
            "night": night, "output_dir": str(out_dir.resolve()), "pack_s": pack_s,
            "workers": len(queues)},
            timeout=0, work_queue_name=q, flow_run_name=f"night shard for {q}"))
        runs[fr.id] = q
    return runs


def wait_for_shards(runs: dict[UUID, str], night_dir: Path, poll_s: float = 2.0
                    ) -> dict[UUID, str]:
    """Wait until every shard is final; returns each one's final state name."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Crashed

    plog = get_run_logger()
    with get_client(sync_client=True) as client:
        while True:
            states = {rid: client.read_flow_run(rid).state for rid in runs}
            finished = any(s is not None and s.is_completed() for s in states.values())
            running = False
            for rid, state in states.items():
                if state is None or state.is_final():
                    continue
                if state.is_running() and is_stale(night_dir / f"shard-{rid}.alive"):
                    msg = (f"the worker of queue {runs[rid]} was lost (its lease in "
                           f"{night_dir} went stale); its unfinished work is taken over")
                    client.set_flow_run_state(rid, Crashed(message=msg), force=True)
                    plog.warning("night shard for %s: %s", runs[rid], msg)
                elif state.is_running():
                    running = True
                elif finished:  # never started, and the night's work is done
                    client.set_flow_run_state(rid, Cancelled(
                        message="the other workers finished the night"), force=True)
                    plog.info("night shard for %s never started: cancelled, the night is "
                              "done", runs[rid])
                else:
                    running = True
            if not running and all(s is not None and s.is_final() for s in
                                   (client.read_flow_run(r).state for r in runs)):
                return {rid: (client.read_flow_run(rid).state.name or "?")  # type: ignore[union-attr]
                        for rid in runs}
            time.sleep(poll_s)


def merge(results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """One summary of the night from its shards': an idea is done when a shard made its
    video; each video says which workers and GPUs rendered its shots."""
    merged: dict[str, Any] = {"done": [], "failed": [], "skipped": [], "left": []}
    if not results:
        return merged
    merged["skipped"] = results[0]["skipped"]
    order: list[str] = []
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        for kind in ("done", "left", "failed"):
            for row in r[kind]:
                if row["where"] not in rows:
                    order.append(row["where"])
                rows.setdefault(row["where"], {}).setdefault(kind, []).append(row)
    for where in order:
        kinds = rows[where]
        if "done" in kinds:
            row = kinds["done"][0]
            merged["done"].append({**row, "made_by": makers(Path(row["final"]))})
        elif "left" in kinds:
            merged["left"].append(max(kinds["left"], key=lambda x: int(x["shots_done"])))
        else:
            merged["failed"].append(kinds["failed"][0])
    merged["shards"] = [{"worker": r.get("made_by", {}).get("worker"),
                         "host": r.get("made_by", {}).get("host"),
                         "gpu": r.get("made_by", {}).get("gpu"),
                         "done": len(r["done"]), "night": r.get("night")} for r in results]
    return merged


def makers(final: Path) -> list[dict[str, Any]]:
    """Worker, host, GPU and shot count of everyone who rendered this video's shots."""
    try:
        shots = json.loads((final.parent / "manifest.json").read_text()).get("shots", [])
    except (OSError, ValueError):
        return []
    count: dict[tuple[str, str, int], int] = {}
    for s in shots:
        m = s.get("made_by") or {}
        k = (str(m.get("worker", "?")), str(m.get("host", "?")), int(m.get("gpu", 0)))
        count[k] = count.get(k, 0) + 1
    return [{"worker": w, "host": h, "gpu": g, "shots": n}
            for (w, h, g), n in sorted(count.items())]


def made_by_text(makers_: list[dict[str, Any]]) -> str:
    return ", ".join(f"{m['worker']} (GPU {m['gpu']}, {m['shots']} shot"
                     f"{'s' if m['shots'] != 1 else ''})" for m in makers_)


def fan_out_night(parsed: ParsedBatch, scenes: int, target_seconds: float,
                  common: dict[str, Any], out_dir: Path, name: str, until: float | None
                  ) -> dict[str, Any] | None:
    """The night spread over the pool's GPU workers; None when there are none to spread
    over (the caller runs the night itself)."""
    plog = get_run_logger()
    pool = own_pool()
    queues = gpu_queues(pool) if pool else []
    if not queues:
        plog.info("no GPU worker queue in the pool: this run renders the night itself")
        return None
    night = f"{name}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    write_manifest(out_dir, night, parsed, scenes, target_seconds, common, until)
    plog.info("night %s over %d GPU worker(s): %s", night, len(queues), ", ".join(queues))
    runs = start_shards(queues, night, out_dir)
    night_dir = out_dir / NIGHT_DIR / night
    states = wait_for_shards(runs, night_dir)
    results = _results(night_dir, runs)
    if not any(s == "Completed" for s in states.values()):
        plog.warning("no shard finished the night (%s): this run finishes it itself",
                     ", ".join(f"{runs[r]} {s}" for r, s in states.items()))
        with contextlib.suppress(Exception):
            results.append(json.loads(Path(night_shard(night, str(out_dir.resolve()))
                                           ).read_text()))
    merged = merge(results, out_dir)
    merged["night_id"] = night
    merged["shard_states"] = {runs[r]: s for r, s in states.items()}
    for row in merged["done"]:
        plog.info("%s: made by %s", row["where"], made_by_text(row["made_by"]))
    return merged


def _results(night_dir: Path, runs: dict[UUID, str]) -> list[dict[str, Any]]:
    out = []
    for rid in runs:
        path = night_dir / f"shard-{rid}.json"
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out
