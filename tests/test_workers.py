"""Several GPU workers through a Prefect work pool, for real: a Prefect server, `prefect deploy`
from prefect.yaml, two `story-to-video worker --gpu N` processes (each a real `prefect worker
start` told a different GPU and its own ComfyUI, a fake one whose steps take time; embedded
LLM), and `prefect deployment run 'story-to-video/overnight'`. The night fans out to both;
one is killed mid-batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from story_to_video.locks import claim, is_stale, release
from story_to_video.models import ShotPlan
from tests.conftest import ROOT
from tests.fake_comfyui import FakeComfyUI, Faults
from tests.prefect_server import PREFECT, prefect_server

STV = str(Path(sys.executable).parent / "story-to-video")
STEP_S = 0.3  # per sampling step of the workers' ComfyUI: 4 steps, about 1.5 s a shot


# -- claims of another host ------------------------------------------------------------------

def test_a_claim_of_another_host_goes_stale_when_its_lease_is_not_refreshed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "shot.claim"
    lock.write_text(json.dumps({"host": "other-host", "pid": 1, "at": 0}))
    monkeypatch.setenv("STV_CLAIM_STALE_S", "60")
    assert not is_stale(lock) and not claim(lock)  # fresh: its owner is alive
    old = time.time() - 61
    os.utime(lock, (old, old))
    assert is_stale(lock) and claim(lock)  # its owner stopped refreshing it: taken over
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    release(lock)
    assert not lock.exists()


def test_a_worker_told_a_gpu_that_does_not_exist_never_starts(tmp_path: Path) -> None:
    env = {**os.environ, "STV_BROKER__GPU_COUNT": "2", "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    res = subprocess.run([STV, "worker", "--gpu", "2", "--name", "w2"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: GPU index 2 does not exist on {socket.gethostname()}: it has GPUs 0..1 "
        "(broker.gpu_count (no NVML here)); the worker was not started and takes no run")


def test_two_workers_told_the_same_gpu_are_serialised_and_say_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from flows.gpu import host_gpu_lock
    from story_to_video.worker import hold_gpu_marker

    first, other = hold_gpu_marker(0, "w0", tmp_path)
    assert other is None
    second, other = hold_gpu_marker(0, "w1", tmp_path)
    assert other is not None and other.startswith("w0 (pid ")  # the warning names it
    _third, other = hold_gpu_marker(1, "w2", tmp_path)
    assert other is None  # another card is free
    first.close()
    second.close()

    order: list[str] = []
    holding = threading.Event()

    def job(name: str, hold_s: float) -> None:
        with host_gpu_lock(0, tmp_path):
            order.append(f"{name} in")
            holding.set()
            time.sleep(hold_s)
            order.append(f"{name} out")

    a = threading.Thread(target=job, args=("a", 0.5))
    a.start()
    assert holding.wait(10)
    with caplog.at_level("INFO", logger="resource_broker.session"):
        job("b", 0.0)  # waits for a: one heavy job per card
    a.join()
    assert order == ["a in", "a out", "b in", "b out"]
    busy = [r.getMessage() for r in caplog.records if "is busy" in r.getMessage()]
    assert busy and busy[0].startswith("GPU 0 is busy (pid ") and busy[0].endswith(
        "; waiting for it")


def test_a_host_whose_output_folder_is_not_the_shared_one_is_refused(tmp_path: Path) -> None:
    from flows.fanout import read_manifest, write_manifest
    from story_to_video.batch import parse_batch_text
    from story_to_video.run import InputError

    shared, other = tmp_path / "shared", tmp_path / "local"
    write_manifest(shared, "n1", parse_batch_text('{"idea": "a fox"}\n', "jsonl"), 1, 3.0, {}, None)
    assert read_manifest(shared, "n1", str(shared))["entries"][0]["idea"] == "a fox"
    with pytest.raises(InputError) as err:
        read_manifest(other, "n1", str(shared))
    assert f"output folder {other} " in str(err.value)
    assert f"shared output folder {shared} " in str(err.value)


# -- real workers ----------------------------------------------------------------------------

@dataclass
class Pool:
    env: dict[str, str]
    project: Path
    tmp: Path
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # each worker's own ComfyUI (its GPU): the fake, with sampling steps that take time, so
    # a shot costs seconds as on a GPU and the workers really share the render
    comfyui: dict[str, FakeComfyUI] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_worker(self, name: str, gpu: int) -> None:
        if name not in self.comfyui:
            self.comfyui[name] = FakeComfyUI(faults=Faults(step_delay_s=STEP_S)).start()
        # each worker plans with its own embedded LLM (llama-cpp-python's server drops a
        # second concurrent request, so one server cannot serve two workers), on one thread:
        # two servers of two threads each on a 2-core CI machine spin against each other
        # greedy decoding: the tiny model plans each idea the same way every run, so
        # whether a plan validates is not left to chance (this test is about workers)
        env = {**self.env, "STV_LLM__EMBEDDED_THREADS": "1", "STV_LLM__TEMPERATURE": "0",
               "STV_ENGINE": "comfyui", "STV_COMFYUI__WORKFLOW": "wan22_14b_t2v",
               "STV_BROKER__GPU_COUNT": "2", "STV_VIDEO__WIDTH": "256",
               "STV_VIDEO__HEIGHT": "144", "STV_LLM__MAX_REPAIR_TRIES": "5",
               "PYTHONUNBUFFERED": "1"}
        out = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.workers[name] = subprocess.Popen(
            [STV, "worker", "--gpu", str(gpu), "--name", name, "--comfyui-url",
             self.comfyui[name].url], env=env, cwd=self.project,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.workers[name].poll() is None, self.log(name)[-3000:]
            if self.polled(name):
                return
            time.sleep(0.5)
        pytest.fail(f"worker {name} never polled its queue:\n{self.log(name)[-3000:]}")

    def polled(self, queue: str) -> bool:
        r = httpx.post(f"{self.env['PREFECT_API_URL']}/work_pools/story-to-video/queues/filter",
                       json={}, timeout=10)
        return any(q["name"] == queue and q["last_polled"] for q in r.json())

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        self.workers.clear()
        for server in self.comfyui.values():
            server.stop()

    def shots_sent(self) -> dict[str, int]:
        """Prompts each worker's ComfyUI received (a shot's, the engine's own checks)."""
        return {n: len(c.prompts) for n, c in self.comfyui.items()}

    def run_overnight(self, batch: Path, out: Path, scenes: int = 1,
                      target_seconds: float = 2) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [PREFECT, "deployment", "run", "story-to-video/overnight", "--param",
             f"batch={batch}", "--param", f"output_dir={out}", "--param", f"scenes={scenes}",
             "--param", f"target_seconds={target_seconds:g}", "--watch", "--watch-timeout",
             "600"],
            env=self.env, cwd=self.project, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    import shutil

    tmp = tmp_path_factory.mktemp("workers")
    with prefect_server(tmp) as env:
        project = tmp / "project"
        shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "__pycache__", ".mypy_cache", ".ruff_cache",
            ".pytest_cache"))
        for args in (["work-pool", "create", "story-to-video", "--type", "process"],
                     ["--no-prompt", "deploy", "--all"]):
            res = subprocess.run([PREFECT, *args], env=env, cwd=project, capture_output=True,
                                 text=True, timeout=180, check=False)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr
        p = Pool(env, project, tmp)
        try:
            yield p
        finally:
            p.stop()


def batch_file(tmp: Path, ideas: list[str]) -> Path:
    path = tmp / "night.jsonl"
    path.write_text("".join(json.dumps({"idea": i}) + "\n" for i in ideas))
    return path


def shots_of(out: Path) -> dict[str, int]:
    return {p.parent.name: len(ShotPlan.model_validate_json(p.read_text()).shots)
            for p in out.glob("*/plan.json")}


def finish(run: subprocess.Popen[str], pool: Pool) -> str:
    out, _ = run.communicate(timeout=700)
    logs = "\n".join(pool.log(n)[-4000:] for n in ("w0", "w1"))
    assert run.returncode == 0 and "Completed" in out, out[-3000:] + logs
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_overnight_batch_fans_out_over_two_real_workers(pool: Pool, tmp_path: Path
                                                           ) -> None:
    pool.start_worker("w0", 0)
    pool.start_worker("w1", 1)
    out = tmp_path / "runs"
    ideas = ["a paper boat race", "an owl reads a map", "a snail races a train",
             "a kite over dunes"]
    batch = batch_file(tmp_path, ideas)
    sent = pool.shots_sent()
    finish(pool.run_overnight(batch, out), pool)
    summary = json.loads((out / "batch-night-summary.json").read_text())
    assert sorted(d["idea"] for d in summary["done"]) == sorted(ideas), summary
    assert sorted(summary["shard_states"].items()) == [("w0", "Completed"),
                                                       ("w1", "Completed")]
    # every shot rendered exactly once, over both workers, and both rendered, each on its
    # own ComfyUI
    made = {n: records_by(out, n) for n in ("w0", "w1")}
    assert len(made["w0"]) + len(made["w1"]) == sum(shots_of(out).values())
    assert made["w0"] and made["w1"], made
    prompts = {n: c - sent.get(n, 0) for n, c in pool.shots_sent().items()}
    assert all(prompts[n] >= len(made[n]) for n in made), prompts
    # the summary says which worker and GPU made each video
    makers = [(m["worker"], m["gpu"]) for d in summary["done"] for m in d["made_by"]]
    assert set(makers) == {("w0", 0), ("w1", 1)}
    for d in summary["done"]:
        manifest = json.loads((Path(d["final"]).parent / "manifest.json").read_text())
        assert sum(m["shots"] for m in d["made_by"]) == len(manifest["shots"])


def worker_pid_of_shard(out: Path, name: str) -> int | None:
    for alive in out.glob(".night/*/shard-*.alive"):
        try:
            pid = int(json.loads(alive.read_text())["pid"])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError):
            continue
        if f"STV_WORKER_NAME={name}".encode() in env:
            return pid
    return None


def records_by(out: Path, worker: str) -> dict[Path, int]:
    found = {}
    for p in out.glob("*/clips/*.json"):
        if p.name.startswith("."):  # a record being written (atomic_path), not one finished
            continue
        try:
            if json.loads(p.read_text())["made_by"]["worker"] == worker:
                found[p] = p.stat().st_mtime_ns
        except (OSError, ValueError, KeyError):
            continue
    return found


def claims_of(out: Path, pid: int) -> list[Path]:
    """The claims (plans, shots, assembly) that process `pid` of this host holds."""
    found = []
    for p in out.rglob("*.claim"):
        try:
            owner = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("pid") == pid and owner.get("host") == socket.gethostname():
            found.append(p)
    return found


def parent_worker(pool: Pool, out: Path) -> str | None:
    """The worker whose flow run process runs the parent of the night into `out` (the
    `overnight` run): Prefect records the process's pid as the run's infrastructure_pid."""
    r = httpx.post(f"{pool.env['PREFECT_API_URL']}/flow_runs/filter", json={
        "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
        "deployments": {"name": {"any_": ["overnight"]}},
        "flows": {"name": {"any_": ["story-to-video"]}}}, timeout=10)
    for fr in r.json():
        if fr["parameters"].get("output_dir") != str(out):
            continue
        try:
            env = Path(f"/proc/{int(fr['infrastructure_pid'])}/environ").read_bytes()
        except (OSError, TypeError, ValueError):
            continue
        for var in env.split(b"\0"):
            if var.startswith(b"STV_WORKER_NAME="):
                return var.split(b"=", 1)[1].decode()
    return None


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_worker_killed_mid_batch_loses_nothing(pool: Pool, tmp_path: Path) -> None:
    for name, gpu in (("w0", 0), ("w1", 1)):
        if name not in pool.workers:
            pool.start_worker(name, gpu)
    out = tmp_path / "runs"
    ideas = ["a lighthouse in fog", "a fox finds a lantern", "a whale sings at dawn",
             "a kite over dunes", "a snail races a train"]
    run = pool.run_overnight(batch_file(tmp_path, ideas), out)
    # the victim is the worker that does not run the parent: a lost parent is another
    # story (README: run `overnight` again), this test is about a lost shard
    deadline = time.monotonic() + 600
    parent = victim = None
    shard_pid = None
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[0][-3000:]
        parent = parent or parent_worker(pool, out)
        victim = {"w0": "w1", "w1": "w0"}.get(parent or "")
        shard_pid = worker_pid_of_shard(out, victim) if victim else None
        # mid-batch: the victim's shard holds a claim (a plan or a shot it is working on)
        # or has finished shots, and videos are still missing
        if shard_pid and (records_by(out, victim or "") or claims_of(out, shard_pid)) and \
                len(list(out.glob("*/final.mp4"))) < len(ideas):
            break
        time.sleep(0.05)
    assert parent and victim and shard_pid, f"no shard of the other worker rendered ({parent})"
    # the victim's host is lost: its worker and the flow run it started die at once
    os.killpg(pool.workers[victim].pid, signal.SIGKILL)
    os.kill(shard_pid, signal.SIGKILL)
    pool.workers.pop(victim).wait(timeout=30)
    kept = records_by(out, victim)
    finish(run, pool)
    summary = json.loads((out / "batch-night-summary.json").read_text())
    assert sorted(d["idea"] for d in summary["done"]) == sorted(ideas), summary
    assert summary["shard_states"] == {parent: "Completed", victim: "Crashed"}
    for p, mtime in kept.items():
        assert p.stat().st_mtime_ns == mtime  # what the victim finished was kept, not redone
    shots = shots_of(out)
    for folder, n in shots.items():  # every shot has its clip once, in every video
        manifest = json.loads((out / folder / "manifest.json").read_text())
        assert len({s["key"] for s in manifest["shots"]}) == n
    takers = {m["worker"] for d in summary["done"] for m in d["made_by"]}
    assert takers == ({"w0", "w1"} if kept else {parent})
    # Prefect shows the lost run as crashed, with why
    r = httpx.post(f"{pool.env['PREFECT_API_URL']}/flow_runs/filter",
                   json={"flow_runs": {"name": {"any_": [f"night shard for {victim}",
                                                         f"night shard on {victim}"]}}},
                   timeout=10)
    crashed = [fr for fr in r.json() if fr["state"]["type"] == "CRASHED"]
    assert crashed and "was lost" in crashed[-1]["state"]["message"]
    # a lost parent is resumed by running `overnight` again (README): the second run over
    # the same folder redoes no plan and no shot, and writes the night's summary
    done = {p: p.stat().st_mtime_ns for p in [*out.glob("*/plan.json"),
                                              *out.glob("*/clips/*.json")]}
    sent = pool.shots_sent()
    (out / "batch-night-summary.json").unlink()
    finish(pool.run_overnight(batch_file(tmp_path, ideas), out), pool)
    again = json.loads((out / "batch-night-summary.json").read_text())
    assert sorted(d["idea"] for d in again["done"]) == sorted(ideas), again
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert pool.shots_sent() == sent  # no ComfyUI got a prompt: nothing rendered again
