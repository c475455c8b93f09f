"""GPU benchmark: the project's own ComfyUI engine and broker driving a real ComfyUI.

Every row renders a batch of shots (same prompt, other seeds) with one strategy and prints
seconds per clip, the ratio to the row's best, peak VRAM and the models ComfyUI loaded:

  comfyui-alone  the engine with no broker: one prompt per shot, ComfyUI does everything
  auto           the broker's own choice for this server (what a run does)
  one-prompt     broker.strategy = one-prompt (models kept between shots)
  staged         broker.strategy = staged: high pass, low pass, decode as three prompts
  pass-major     every high pass, then every low pass, then every decode (one expert load)

A second process holds GPU memory so that only --free GiB stay free (a smaller card), and an
LLM stand-in (a process that holds --llm-gib and reloads them from a weights file) sits
beside ComfyUI for the LLM rows: kept, partly offloaded, unloaded, or as the broker decides.
`--soak N` sends N prompts of varying sizes and records ComfyUI's RSS and VRAM after each
/free. `--vram WxHxF ...` records the VRAM of each stage of one staged shot per size (the
data benchmarks/calibrate_vram.py fits the cost model on). Results: JSON + log under --out
(benchmarks/results/). Run by benchmarks/gpu_run.sh on the GPU machine; on a CPU (tiny
models) it checks itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from resource_broker.broker import Broker  # noqa: E402
from resource_broker.gpu import (  # noqa: E402
    GIB,
    GpuMonitor,
    GpuReading,
    GpuUnavailable,
    NoGpuMonitor,
    open_monitor,
    settled_free_gib,
)
from resource_broker.llm_control import NoLLM  # noqa: E402
from resource_broker.session import make_broker, release_comfyui_vram  # noqa: E402
from resource_broker.timeline import Timeline, VramSampler  # noqa: E402
from story_to_video.config import BrokerSettings, ComfyUISettings, Settings  # noqa: E402
from story_to_video.engines.comfyui import ComfyUIEngine  # noqa: E402
from story_to_video.models import Shot  # noqa: E402

log = logging.getLogger("gpu-bench")
STRATEGIES = ("comfyui-alone", "auto", "one-prompt", "staged", "pass-major")
PROMPT = ("A lighthouse keeper in a yellow raincoat climbs a spiral stair at dusk, warm lamp "
          "light, cinematic, 35mm film")

# A process that holds GiB of GPU memory until its stdin closes; with a weights file it reads
# them from there first (a model load: disk or page cache, then host to device).
HOLDER = r"""
import sys, time, torch
gib, src = float(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "")
t = time.monotonic()
n = int(gib * 2**30)
try:
    buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    if src:
        chunk, done = 256 << 20, 0
        with open(src, "rb", buffering=0) as f:
            host = torch.empty(chunk, dtype=torch.uint8).pin_memory()
            while done < n:
                got = f.readinto(memoryview(host.numpy()))
                if not got:
                    f.seek(0)
                    continue
                take = min(got, n - done)
                buf[done:done + take].copy_(host[:take], non_blocking=False)
                done += take
    torch.cuda.synchronize()
    print(f"ready {time.monotonic() - t:.3f}", flush=True)
except torch.OutOfMemoryError as err:
    print(f"oom {err}".replace("\n", " "), flush=True)
    sys.exit(3)
sys.stdin.read()
"""


class Holder:
    """GPU memory held by another process (a smaller card, or the LLM beside ComfyUI)."""

    def __init__(self, gib: float, weights: Path | None = None) -> None:
        self.gib, self.proc, self.load_s = gib, None, 0.0
        self.oom = ""
        if gib <= 0:
            return
        args = [sys.executable, "-c", HOLDER, str(gib)] + ([str(weights)] if weights else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if line.startswith("ready"):
            self.load_s = float(line.split()[1])
        else:
            self.oom = line or "holder exited"
            self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                if self.proc.stdin:
                    self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


class StandInLLM:
    """LLMControl for the stand-in: unload, partial offload and reload for real (GPU memory
    taken and given back, reload read from a weights file as a llama.cpp server would)."""

    name, controllable, outlives_night = "stand-in", True, True

    def __init__(self, gib: float, weights: Path | None) -> None:
        self.full, self.weights = gib, weights
        self.holder = Holder(gib, weights)
        self.reload_s: float | None = None

    def gpu_gib(self) -> float:
        return self.holder.gib if self.holder.proc else 0.0

    def release(self, gpu_fraction: float = 0.0) -> str:
        self.holder.stop()
        self.holder = Holder(self.full * gpu_fraction, self.weights)
        return f"stand-in now holds {self.gpu_gib():.1f} GiB"

    def restore(self) -> str:
        self.holder.stop()
        self.holder = Holder(self.full, self.weights)
        self.reload_s = self.holder.load_s
        if self.holder.oom:
            return f"reload failed: {self.holder.oom}"
        return f"reloaded {self.full:.1f} GiB in {self.holder.load_s:.1f}s"

    def close(self) -> None:
        self.holder.stop()


@dataclass
class Row:
    free_gib: float
    dynamic: bool
    width: int
    height: int
    frames: int
    steps: str  # "4" (2+2 with the LoRA) or "20+20" (no LoRA)
    strategy: str
    shots: int
    llm_gib: float = 0.0
    llm_move: str = ""  # keep | partial | unload | broker
    clip_s: list[float] = field(default_factory=list)
    batch_s: float = 0.0
    per_clip_s: float = 0.0
    peak_used_gib: float = 0.0
    base_used_gib: float = 0.0  # the card before the row: other processes + ComfyUI idle
    min_free_gib: float = 0.0
    loads: dict[str, int] = field(default_factory=dict)
    partial_loads: int = 0
    broker: list[str] = field(default_factory=list)
    llm_reload_s: float | None = None
    llm_restore: str = ""  # what the reload after the video work said
    ratio_to_best: float = 0.0
    error: str = ""


def shots(n: int, width: int, height: int, frames: int) -> list[Shot]:
    return [Shot(id=f"s01_sh{i + 1:02d}", scene_index=0, shot_index=i, action="climbs",
                 prompt=PROMPT, negative_prompt="blurry, distorted", frames=frames, fps=16,
                 width=width, height=height, seed=1000 + i) for i in range(n)]


def step_inputs(steps: str) -> dict[str, Any]:
    if steps == "4":
        return {}
    hi, lo = (int(x) for x in steps.split("+"))
    return {"steps": hi + lo, "split_step": hi, "lora_strength_high": 0.0,
            "lora_strength_low": 0.0}


@dataclass
class Env:
    comfyui: Path
    models: Path
    work: Path
    python: str
    cpu: bool
    weights: Path | None  # what the LLM stand-in reloads from

    def command(self, port: int, dynamic: bool, extra: list[str]) -> list[str]:
        from comfyui_test_server import Prepared, command

        cmd: list[str] = command(Prepared(self.comfyui, Path(self.python), self.models), port,
                      self.work, extra, cpu=self.cpu)
        # torch's peak between two reads (TorchAllocated): an extension of our own, copied
        # into this server's custom_nodes (under --base-directory, not the ComfyUI source)
        shutil.copy(Path(__file__).with_name("comfyui_torch_peak.py"),
                    self.work / "custom_nodes" / "stv_torch_peak.py")
        return cmd + ([] if dynamic or self.cpu else ["--disable-dynamic-vram"])


@contextlib.contextmanager
def comfyui(env: Env, dynamic: bool, port: int, tag: str,
            extra: list[str] | None = None) -> Iterator[ComfyUIEngine]:
    settings = Settings(engine="comfyui", comfyui=ComfyUISettings(
        workflow="wan22_14b_t2v", url=f"http://127.0.0.1:{port}",
        command=env.command(port, dynamic, extra or []), cwd=str(env.work),
        start_timeout_s=600, stall_timeout_s=1200))
    log_dir = env.work / "logs" / tag
    log_dir.mkdir(parents=True, exist_ok=True)
    engine = ComfyUIEngine.from_settings(settings, log_dir)
    try:
        engine.server_info()  # starts it
        yield engine
    finally:
        engine.close()


def comfy_log(engine: ComfyUIEngine) -> str:
    path = getattr(engine.server, "log_path", None)
    return Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""


def run_row(engine: ComfyUIEngine, row: Row, monitor: GpuMonitor, out: Path,
            weights: Path | None = None) -> Row:
    settings = Settings(engine="comfyui", broker=BrokerSettings(
        strategy="staged" if row.strategy == "staged" else
        "one-prompt" if row.strategy == "one-prompt" else "auto",
        budget_gib=row.free_gib if monitor.available else None,
        llm_gib=row.llm_gib))
    engine.broker = None
    broker = None
    if row.strategy != "comfyui-alone":
        broker = make_broker(settings, engine, monitor, NoLLM("no LLM in this row"),
                             out / ".calibration.json")
    engine.extra_inputs = step_inputs(row.steps)
    batch = shots(row.shots, row.width, row.height, row.frames)
    release_comfyui_vram(engine, monitor)  # every row starts cold, with the card emptied
    llm = None
    if row.llm_gib:  # the LLM is loaded before the video work, as after planning
        llm = StandInLLM(row.llm_gib, weights)
        if not llm.gpu_gib():
            row.error = f"the LLM stand-in could not take {row.llm_gib} GiB: {llm.holder.oom}"
            return row
        if broker is not None:
            broker.llm = llm
    try:
        return _measure(engine, row, monitor, out, broker, batch, llm)
    finally:
        if llm is not None:
            llm.close()


def _measure(engine: ComfyUIEngine, row: Row, monitor: GpuMonitor, out: Path,
             broker: Broker | None, batch: list[Shot], llm: StandInLLM | None) -> Row:
    if llm is not None and row.llm_move in ("partial", "unload"):
        llm.release(0.5 if row.llm_move == "partial" else 0.0)
    elif llm is not None and broker is not None and row.llm_move == "broker":
        broker.place_llm_for_video(broker.plan(row.frames, row.width, row.height, "s01_sh01"))
    before = comfy_log(engine)
    if monitor.available:
        row.base_used_gib = round(monitor.read().used_bytes / GIB, 2)
    sampler = VramSampler(monitor, 0.2)
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with sampler:
        try:
            if row.strategy == "pass-major":
                results = engine.render_pass_major(
                    batch, [clips / f"{s.id}.mp4" for s in batch])
                row.clip_s = [round(r.seconds, 2) for r in results]
            else:
                for s in batch:
                    r = engine.render(s, clips / f"{s.id}.mp4")
                    row.clip_s.append(round(r.seconds, 2))
        except Exception as err:  # a row that fails is a result too (e.g. OOM)
            row.error = f"{type(err).__name__}: {err}"[:500]
    row.batch_s = round(time.monotonic() - t0, 2)
    row.per_clip_s = round(row.batch_s / row.shots, 2)
    tl = sampler.timeline
    if tl.samples:
        row.peak_used_gib = round(tl.peak_used_gib(), 2)
        row.min_free_gib = round(tl.min_free_gib(), 2)
    new = comfy_log(engine)[len(before):]
    for name in re.findall(r"Requested to load (\w+)", new):
        row.loads[name] = row.loads.get(name, 0) + 1
    row.partial_loads = len(re.findall(r"loaded partially", new))
    if broker is not None:
        row.broker = [f"{e.stage}: {e.action} ({e.outcome})" for e in broker.events
                      if e.stage in ("experts", "llm", "decode", "encode")][:8]
    if llm is not None:  # after the video work: ComfyUI frees its VRAM, the LLM reloads
        if broker is not None:
            event = broker.restore_llm()
            row.llm_restore = event.outcome if event else ""
        else:
            release_comfyui_vram(engine, monitor)
            row.llm_restore = llm.restore()
        row.llm_reload_s = llm.reload_s
        log.info("LLM after the video work: %s", row.llm_restore)
    return row


SOAK_SIZES = [(832, 480, 33), (832, 480, 81), (480, 832, 49), (1280, 720, 33), (832, 480, 17)]
CPU_SOAK_SIZES = [(128, 128, 5), (128, 128, 9), (128, 160, 5), (160, 128, 5), (128, 128, 13)]


def soak(engine: ComfyUIEngine, n: int, out: Path, unload_every: int,
         rows: list[dict[str, Any]], save: Callable[[], None],
         sizes: list[tuple[int, int, int]] = SOAK_SIZES) -> None:
    """n prompts of varying sizes; after every `unload_every`-th a /free with unload (the
    broker's leak check), read 1 s after it and once the free memory stopped rising, with
    ComfyUI's RSS. The prompts between keep their models: no /free at all, because in
    ComfyUI 0.33 any /free with free_memory also unloads the models (main.py reads the
    unload flag with free_memory as its default). A prompt after a /free is cold."""
    import psutil  # type: ignore[import-untyped]

    pid = getattr(engine.server, "pid", None)
    assert pid is not None, "the soak needs a ComfyUI the benchmark started"
    monitor = open_monitor(0)
    clips = out / "soak"
    clips.mkdir(parents=True, exist_ok=True)
    cold = True
    for i in range(n):
        w, h, f = sizes[i % len(sizes)]
        s = shots(1, w, h, f)[0].model_copy(update={"seed": 5000 + i})
        t = time.monotonic()
        engine.render(s, clips / f"soak{i}.mp4")
        took = time.monotonic() - t
        row: dict[str, Any] = {"i": i, "size": f"{w}x{h}x{f}", "seconds": round(took, 2),
                               "cold": cold, "unloaded": (i + 1) % unload_every == 0}
        if row["unloaded"]:
            engine.client.free(unload_models=True, free_memory=True)
            row.update(soak_free_readings(monitor))
        elif monitor.available:
            row["vram_used_gib"] = round(monitor.read().used_bytes / GIB, 3)
        row["rss_gib"] = round(psutil.Process(pid).memory_info().rss / GIB, 3)
        rows.append(row)
        # calibrate_time.py reads the cold lines ("soak i WxHxF: S s") as clips with loads
        log.info("soak %d %s%s: %.1fs, RSS %.2f GiB, %s", i, row["size"],
                 "" if cold else " models kept", took, row["rss_gib"], soak_vram_text(row))
        cold = row["unloaded"]
        save()


def soak_vram_text(row: dict[str, Any]) -> str:
    if "settle_s" in row:
        return (f"VRAM after /free {row['vram_used_1s_gib']:.2f} GiB at 1 s, "
                f"{row['vram_used_settled_gib']:.2f} GiB settled ({row['settle_s']:.1f} s)")
    if "vram_used_gib" in row:
        return f"VRAM {row['vram_used_gib']:.2f} GiB with the models kept"
    return "no VRAM reading" + (" (/free sent)" if row["unloaded"] else "")


def soak_free_readings(monitor: GpuMonitor) -> dict[str, float]:
    """Used VRAM 1 s after a /free and once the free memory stopped rising (what the
    broker's leak check reads), and how long that took."""
    if not monitor.available:
        return {}
    t = time.monotonic()
    time.sleep(1.0)
    at_1s = monitor.read()
    free = settled_free_gib(monitor, first_wait_s=0.0)
    return {"vram_used_1s_gib": round(at_1s.total_gib - at_1s.free_gib, 3),
            "vram_used_settled_gib": round(at_1s.total_gib - free, 3),
            "settle_s": round(time.monotonic() - t, 2)}


def vram_stages(engine: ComfyUIEngine, monitor: GpuMonitor, sizes: list[str], work: Path,
                rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Per-stage VRAM of one staged shot per size (high pass, unload, low pass, decode as
    separate prompts), the card sampled every 0.1 s and torch's peak allocation every 0.05 s
    (TorchAllocated): what calibrate_vram.py fits the cost model on.
    Run it on the classic loader with the whole card free, so that ComfyUI neither offloads
    nor fills the card (dynamic VRAM would)."""
    settings = Settings(engine="comfyui", broker=BrokerSettings(strategy="staged"))
    broker = make_broker(settings, engine, monitor, NoLLM("no LLM in this run"),
                         work / ".calibration.json")
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        w, h, f = (int(x) for x in size.split("x"))
        shot = shots(1, w, h, f)[0]
        release_comfyui_vram(engine, monitor)
        base = monitor.read().used_bytes / GIB
        sampler = VramSampler(monitor, 0.1)
        inside = VramSampler(TorchAllocated(engine.client.url), 0.05)
        engine.broker, engine.timeline = broker, sampler.timeline
        t0 = time.monotonic()
        try:
            with sampler, inside:
                r = engine.render(shot, clips / f"vram-{size}.mp4")
                time.sleep(0.3)
        except Exception as err:  # an OOM is a result too
            rows.append({"size": size, "error": f"{type(err).__name__}: {err}"[:300]})
            save()
            continue
        finally:
            engine.broker, engine.timeline = None, None
        rows.append({"size": size, "seconds": round(time.monotonic() - t0, 2),
                     "base_used_gib": round(base, 3), "clip_s": round(r.seconds, 2),
                     **stage_peaks(sampler.timeline, shot.id),
                     **{f"torch_{k}": v for k, v in stage_peaks(
                         with_marks(inside.timeline, sampler.timeline), shot.id).items()
                        if k != "marks"},
                     "trace": trace(sampler.timeline, inside)})
        log.info("vram %s: %s", size,
                 {k: v for k, v in rows[-1].items() if k not in ("size", "trace")})
        save()


class TorchAllocated:
    """A GpuMonitor whose 'used' is what torch allocated inside ComfyUI: the decode runs
    inside memory the allocator kept from the passes, which the card's reading (NVML) cannot
    see. Each read is torch's peak since the read before, from our extension
    (comfyui_torch_peak.py), so no peak falls between two samples; on a server without it,
    the allocation at that instant from /system_stats. Its own HTTP client: the sampler
    reads from a thread while the engine talks to the server."""

    def __init__(self, url: str) -> None:
        from story_to_video.engines.comfyui.client import ComfyUIClient

        self.client = ComfyUIClient(url, timeout_s=5.0)
        self.reserved: list[tuple[float, float]] = []  # (monotonic s, GiB torch reserved)
        self.peaks = True  # until the server says it has no /stv/torch_peak

    @property
    def available(self) -> bool:
        return True

    def describe(self) -> str:
        return ("torch's peak allocation between reads (/stv/torch_peak)" if self.peaks
                else "torch allocation from ComfyUI /system_stats")

    def read(self) -> GpuReading:
        try:
            total, used, reserved = self._peak() if self.peaks else self._instant()
        except Exception as err:  # the sampler stops reading, the run goes on
            raise GpuUnavailable(f"torch allocation: {err}") from err
        self.reserved.append((time.monotonic(), reserved / GIB))
        return GpuReading(0, "torch", total, used, total - used, (), self.describe())

    def _peak(self) -> tuple[int, int, int]:
        r = self.client.http.get("/stv/torch_peak")
        d = r.json() if r.status_code == 200 else {}
        if not d.get("cuda"):  # an older benchmark server, or a CPU one
            self.peaks = False
            return self._instant()
        return int(d["total"]), int(d["peak"]), int(d["reserved"])

    def _instant(self) -> tuple[int, int, int]:
        d = self.client.system_stats()["devices"][0]
        total, reserved = int(d["vram_total"]), int(d["torch_vram_total"])
        return total, reserved - int(d["torch_vram_free"]), reserved


def trace(card: Timeline, inside: VramSampler) -> dict[str, Any]:
    """The raw samples behind the stage peaks (seconds from the card sampler's start), so a
    flat stage can be told from a missed one: card used, torch active and reserved."""
    assert isinstance(inside.monitor, TorchAllocated)
    shift = inside.timeline.t0 - card.t0
    return {"torch_source": inside.monitor.describe(),
            "marks": [[round(t, 2), label] for t, label in card.marks],
            "card_used": [[round(s.t, 2), round(s.used_gib, 3)] for s in card.samples],
            "torch_active": [[round(s.t + shift, 2), round(s.used_gib, 3)]
                             for s in inside.timeline.samples],
            "torch_reserved": [[round(t - card.t0, 2), round(g, 3)]
                               for t, g in inside.monitor.reserved]}


def with_marks(tl: Timeline, marked: Timeline) -> Timeline:
    """`tl` with the stage marks of `marked`, shifted to its own start time."""
    tl.marks = [(t + marked.t0 - tl.t0, label) for t, label in marked.marks]
    return tl


def stage_peaks(tl: Timeline, shot_id: str) -> dict[str, float]:
    """Peak used GiB in each stage's window, the used GiB when the decode began, and the
    decode's own rise (the window's peak can be the expert ComfyUI drops as it begins)."""
    marks = {label.removeprefix(f"{shot_id} "): t for t, label in tl.marks}
    end = tl.samples[-1].t if tl.samples else 0.0
    bounds = {"high": (marks.get("high", 0.0), marks.get("unload high", end)),
              "low": (marks.get("low", end), marks.get("decode", end)),
              "decode": (marks.get("decode", end), end)}
    out = {f"{k}_peak_gib": round(tl.peak_used_gib(a, b), 3) for k, (a, b) in bounds.items()}
    out["decode_rise_gib"] = round(tl.rise_gib(*bounds["decode"]), 3)
    before = [s.used_gib for s in tl.samples if s.t <= marks.get("decode", end)]
    out["before_decode_gib"] = round(before[-1], 3) if before else 0.0
    out["marks"] = sorted(marks)  # type: ignore[assignment]
    return out


def parse_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    for size in args.size:
        w, h, f = (int(x) for x in size.split("x"))
        for steps in args.steps:
            if args.llm_gib:
                for gib in args.llm_gib:
                    for move in args.llm_move:
                        rows.append(Row(args.free, args.dynamic, w, h, f, steps, "auto",
                                        args.shots, gib, move))
            else:
                for strat in args.strategies:
                    rows.append(Row(args.free, args.dynamic, w, h, f, steps, strat,
                                    args.shots))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="ComfyUI source folder")
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stv-bench"))
    ap.add_argument("--out", type=Path, required=True, help="results folder")
    ap.add_argument("--tag", required=True, help="name of this run's JSON and log")
    ap.add_argument("--free", type=float, default=32.0, help="GiB left free for ComfyUI")
    ap.add_argument("--dynamic", type=int, choices=[0, 1], default=1)
    ap.add_argument("--size", nargs="+", default=["832x480x81"])
    ap.add_argument("--steps", nargs="+", default=["4"])
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--llm-gib", nargs="*", type=float, default=[])
    ap.add_argument("--llm-move", nargs="+", default=["keep", "partial", "unload", "broker"])
    ap.add_argument("--soak", type=int, default=0)
    ap.add_argument("--soak-unload-every", type=int, default=1,
                    help="a /free with unload after every k-th prompt (none between)")
    ap.add_argument("--vram", nargs="+", default=[], metavar="WxHxF",
                    help="per-stage VRAM of one staged shot per size (classic loader)")
    ap.add_argument("--cpu", action="store_true", help="a CPU server (self-check)")
    ap.add_argument("--port", type=int, default=8390)
    ap.add_argument("--python", default=sys.executable, help="ComfyUI's Python")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(args.out / f"{args.tag}.log")])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the samplers poll at 10 Hz
    monitor: GpuMonitor = NoGpuMonitor("cpu self-check") if args.cpu else open_monitor(0)
    weights = next(iter(sorted((args.models / "diffusion_models").glob("*.safetensors"))), None)
    env = Env(args.comfyui, args.models, args.work, args.python, args.cpu, weights)
    card = None
    if monitor.available:  # the rest of the card is taken: ComfyUI sees args.free GiB
        take = monitor.read().free_gib - args.free - 0.6  # 0.6: ComfyUI's CUDA context
        card = Holder(take) if take > 0 else None
        log.info("card: %.1f GiB held by another process, %.1f GiB free", take,
                 monitor.read().free_gib)
    results: dict[str, Any] = {"tag": args.tag, "argv": sys.argv[1:], "rows": []}
    try:
        with comfyui(env, bool(args.dynamic), args.port, args.tag) as engine:
            results["server"] = engine.server_info().describe()
            if args.soak:
                soak(engine, args.soak, args.out / "clips", args.soak_unload_every,
                     results.setdefault("soak", []), lambda: write(args, results),
                     CPU_SOAK_SIZES if args.cpu else SOAK_SIZES)
            elif args.vram:
                vram_stages(engine, monitor, args.vram, args.work,
                            results.setdefault("vram", []), lambda: write(args, results))
            else:
                warm = Row(args.free, bool(args.dynamic), 832 if not args.cpu else 128,
                           480 if not args.cpu else 128, 17 if not args.cpu else 5, "4",
                           "comfyui-alone", 1)
                run_row(engine, warm, monitor, args.work)  # page cache + encoder warm
                log.info("warm-up: %.1fs", warm.batch_s)
                for row in parse_rows(args):
                    results["rows"].append(report(run_row(engine, row, monitor, args.work,
                                                          weights)))
                    write(args, results)
    finally:
        if card is not None:
            card.stop()
    finish(results)
    write(args, results)
    for path in (args.work / "logs" / args.tag).glob("comfyui.log"):
        (args.out / f"{args.tag}-comfyui.log").write_bytes(path.read_bytes())
    return 0


def report(row: Row) -> dict[str, Any]:
    log.info("%s free=%s dyn=%s %dx%dx%d steps=%s llm=%s/%s: %.1fs per clip %s peak %.1f "
             "GiB loads %s%s", row.strategy, row.free_gib, row.dynamic, row.width, row.height,
             row.frames, row.steps, row.llm_gib, row.llm_move, row.per_clip_s, row.clip_s,
             row.peak_used_gib, row.loads, f" ERROR {row.error}" if row.error else "")
    return asdict(row)


def finish(results: dict[str, Any]) -> None:
    """Ratio of each row to the best of its size/steps/LLM group; the table printed."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results["rows"]:
        key = (r["width"], r["height"], r["frames"], r["steps"], r["llm_gib"])
        groups.setdefault(key, []).append(r)
    for rows in groups.values():
        ok = [r["per_clip_s"] for r in rows if not r["error"]]
        best = min(ok) if ok else 0.0
        for r in rows:
            r["ratio_to_best"] = round(r["per_clip_s"] / best, 3) if best and not r["error"] \
                else None
    print("\n| free GiB | dynamic | size | steps | LLM GiB / move | strategy | s per clip | "
          "ratio to best | peak GiB above start | loads | clips s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['free_gib']:g} | {'on' if r['dynamic'] else 'off'} | "
              f"{r['width']}x{r['height']}x{r['frames']} | {r['steps']} | "
              f"{r['llm_gib']:g} {r['llm_move']} | {r['strategy']} | {r['per_clip_s']} | "
              f"{r['ratio_to_best']} | {r['peak_used_gib'] - r['base_used_gib']:.1f} | "
              f"{sum(r['loads'].values())} | {r['clip_s']} {r['error'][:60]} |")


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    path = args.out / f"{args.tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
