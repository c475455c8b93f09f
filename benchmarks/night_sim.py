"""A simulated night: idea by idea against stage by stage, on the batch's own scheduler.

The world is simulated, the night is not: `flows.night.run_night` runs for real (Prefect
tasks, the real planner, the broker, claims and records on disk) inside a `SimNight`
whose clock is virtual and whose LLM and video engine take the times and memory of the
GPU measurements (shared/ANCHORS.md and the README's tables):

- sampling, Wan 2.2 A14B in ComfyUI on an H100, one step at cfg 1: 2.02 s at 81 frames
  832x480, 6.95 s at 161 frames (6.7-7.2 measured), each step jittered by 3 %;
- VAE decode 2.31 s at 81 f 832x480 (4.84 s at 1280x720);
- loads from disk: a 13.57 GiB fp8 expert, umt5 5.8 GiB, the VAE 0.93 GiB, at 2.5 GiB/s
  (+-10 % per load); a model still in host RAM comes back in 0.52 s per expert (pinned copy);
- the LLM: 14 GiB (a 14B model at Q6), loaded in 25 s, 40 tokens/s, on the GPU while it
  plans; a 32 GiB card, so the broker has to move it for video work; stories and plans of
  varying length, and 1 to 3 shots per scene, as a real LLM answers.

Idea by idea is the night of one idea, run once per idea (what the batch did before:
LLM, plan, move the LLM, render, assemble, next idea); stage by stage is one night of all
ideas. For each it prints model loads of each kind, total time, GPU idle time between GPU
stages and the ETA's error (the ETA made at the start of the night, before any plan).

    python benchmarks/night_sim.py --ideas 1 5 20 --out benchmarks/results/night-sim.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.gpu import GpuSession  # noqa: E402
from flows.night import Idea, NightEnv, NightOptions, _assembled, run_night  # noqa: E402
from resource_broker.broker import Broker  # noqa: E402
from resource_broker.cost_model import GIB, MODELS, CostModel, tokens  # noqa: E402
from resource_broker.gpu import GpuReading, NoGpuMonitor  # noqa: E402
from resource_broker.llm_control import LLMControl  # noqa: E402
from resource_broker.timeline import VramSampler  # noqa: E402
from story_to_video.atomic import write_json_atomic  # noqa: E402
from story_to_video.batch import ParsedBatch, parse_batch_text  # noqa: E402
from story_to_video.config import Settings  # noqa: E402
from story_to_video.engines.base import (  # noqa: E402
    ClipResult,
    EngineStatus,
    ProgressCallback,
    VideoEngine,
)
from story_to_video.llm.base import Completion, LLMBackend, Message, TokenCallback  # noqa: E402
from story_to_video.models import Shot  # noqa: E402

SPEC = MODELS["wan2.2-14b"]
N81, N161 = 32760, 63960
# a*n + b*n^2 through the two ComfyUI measurements (2.02 s and 6.95 s per step)
_B = (6.95 / N161 - 2.02 / N81) / (N161 - N81)
_A = 2.02 / N81 - _B * N81


@dataclass
class Truth:
    """The simulated machine: what the measurements say, with run-to-run jitter."""

    disk_gib_per_s: float = 2.5
    ram_copy_s_per_gib: float = 0.52 / 13.57
    step_jitter: float = 0.03
    load_jitter: float = 0.10
    encode_s: float = 0.5
    prompt_overhead_s: float = 1.0
    llm_gib: float = 14.0
    llm_load_s: float = 25.0
    llm_tokens_per_s: float = 40.0
    card_gib: float = 32.0
    steps: tuple[int, int] = (2, 2)  # high-noise, low-noise sampling steps (4-step LoRA)


@dataclass
class Span:
    start: float
    end: float
    what: str
    busy: bool  # the GPU computes (sampling, decoding, encoding, the LLM generating)


@dataclass
class World:
    """Virtual clock, what ran when, and the loads of each kind; shared by every night."""

    truth: Truth = field(default_factory=Truth)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    t: float = 0.0
    spans: list[Span] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)
    llm_loaded: bool = True  # the user's LM Studio has it loaded when the night starts
    llm_on_gpu: float = 1.0  # share of its layers on the GPU
    fail_unload: bool = False

    def spend(self, seconds: float, what: str, busy: bool) -> None:
        self.spans.append(Span(self.t, self.t + seconds, what, busy))
        self.t += seconds

    def count(self, kind: str) -> None:
        self.loads[kind] = self.loads.get(kind, 0) + 1

    def jitter(self, x: float, j: float) -> float:
        return x * self.rng.uniform(1 - j, 1 + j)

    def gpu_idle_s(self) -> float:
        """Time between the first and the last GPU computation with the GPU not computing."""
        busy = sorted((s.start, s.end) for s in self.spans if s.busy)
        if not busy:
            return 0.0
        idle, end = 0.0, busy[0][1]
        for a, b in busy[1:]:
            idle += max(0.0, a - end)
            end = max(end, b)
        return idle


# -- the LLM -----------------------------------------------------------------------------------

class SimLLM:
    """Answers the planner like a local LLM would: stories of varying length, a valid bible,
    1 to 3 shots per scene; an idea containing BROKEN gets invalid JSON every time."""

    def __init__(self, world: World) -> None:
        self.w = world

    @property
    def description(self) -> str:
        return "simulated 14B LLM"

    def _generate(self, n_tokens: int) -> float:
        seconds = n_tokens / self.w.truth.llm_tokens_per_s
        self.w.spend(seconds, "llm", busy=self.w.llm_on_gpu > 0)
        return seconds

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 on_token: TokenCallback | None = None,
                 deadline_s: float | None = None) -> Completion:
        n = self.w.rng.randint(300, 600)
        words = " ".join(["The keeper climbs the stairs and the light turns."] * (n // 10))
        if "BROKEN" in " ".join(m["content"] for m in messages):
            words += " BROKEN"  # the plan's prompts carry the story: its JSON will be bad
        return Completion(words, n, self._generate(n))

    def complete_json(self, messages: list[Message], schema: dict[str, Any], *,
                      max_tokens: int, temperature: float,
                      deadline_s: float | None = None) -> Completion:
        text = " ".join(m["content"] for m in messages)
        props = schema.get("properties", {})
        if "BROKEN" in text:
            n = 200
            return Completion("{not json", n, self._generate(n))
        if "scenes" in props:
            sc = props["scenes"]
            shot_spec = sc["items"]["properties"]["shots"]
            lo, hi = shot_spec.get("minItems", 1), shot_spec.get("maxItems", 3)
            scenes = [{"title": f"Scene {i + 1}", "setting": "a stone pier at dusk",
                       "shots": [{"action": "Mara walks along the pier at dusk",
                                  "camera": "pan-left", "characters": ["Mara"]}
                                 for _ in range(self.w.rng.randint(lo, min(hi, 3)))]}
                      for i in range(sc["minItems"])]
            body = json.dumps({"scenes": scenes})
            n = 120 * sum(len(s["shots"]) for s in scenes) + 80
        else:
            body = json.dumps({"style": "cinematic, 35mm film", "palette": "teal and amber",
                               "characters": [{"name": "Mara", "look": "tall, grey hair",
                                               "wardrobe": "grey coat"}]})
            n = self.w.rng.randint(150, 300)
        return Completion(body, n, self._generate(n), "json_schema")

    def models(self) -> list[str]:
        return ["sim-14b"]


class SimLLMControl:
    """LM Studio as the broker sees it: unload, reload with a GPU share, reload after."""

    name = "sim-lmstudio"
    outlives_night = True

    def __init__(self, world: World) -> None:
        self.w = world
        self.controllable = True

    def gpu_gib(self) -> float:
        return self.w.truth.llm_gib * self.w.llm_on_gpu if self.w.llm_loaded else 0.0

    def _load(self, share: float) -> None:
        self.w.spend(self.w.jitter(self.w.truth.llm_load_s, self.w.truth.load_jitter),
                     "llm-load", busy=False)
        self.w.count("llm")
        self.w.llm_loaded, self.w.llm_on_gpu = True, share

    def release(self, gpu_fraction: float = 0.0) -> str:
        if self.w.fail_unload:
            self.controllable = False
            return f"{self.name} did not answer the unload; its VRAM is counted as taken"
        self.w.llm_loaded, self.w.llm_on_gpu = False, 0.0
        if gpu_fraction > 0:
            self._load(gpu_fraction)
            return f"reloaded with GPU ratio {gpu_fraction:.2f}"
        return "unloaded"

    def restore(self) -> str:
        if self.w.llm_loaded and self.w.llm_on_gpu >= 1.0:
            return "nothing to restore"
        self._load(1.0)
        return "loaded again"


class SimLLMSession:
    def __init__(self, world: World) -> None:
        self.w = world
        self.load_s = 0.0
        if not world.llm_loaded:
            t0 = world.t
            SimLLMControl(world).restore()
            self.load_s = world.t - t0
        self.backend: LLMBackend = SimLLM(world)

    def after_planning(self) -> None:
        return None

    def control(self, settings: Settings) -> LLMControl:
        return SimLLMControl(self.w)

    def close(self) -> None:
        return None


# -- the GPU and the engine --------------------------------------------------------------------

class SimEngine:
    """ComfyUI with Wan 2.2 A14B as the broker drives it: models cached in host RAM until
    /free with free_memory, in VRAM until an unload; a two-expert shot run as one prompt
    when the broker keeps both experts, else as three."""

    name = "comfyui"
    is_preview = False

    def __init__(self, world: World) -> None:
        self.w = world
        self.vram: set[str] = set()
        self.ram: set[str] = set()
        self.broker: Broker | None = None
        self.steps = world.truth.steps

    def fingerprint(self) -> str:
        return "sim-wan22-14b"

    def check(self) -> EngineStatus:
        return EngineStatus(True, "simulated")

    def used_gib(self) -> float:
        sizes = {"text_encoder": SPEC.text_encoder_bytes, "high": SPEC.expert_bytes,
                 "low": SPEC.expert_bytes, "vae": SPEC.vae_weight_bytes}
        return sum(sizes[m] for m in self.vram) / GIB

    def _load(self, model: str) -> None:
        if model in self.vram:
            return
        size = {"text_encoder": SPEC.text_encoder_bytes, "vae": SPEC.vae_weight_bytes}.get(
            model, SPEC.expert_bytes) / GIB
        t = self.w.truth
        if model in self.ram:
            self.w.spend(size * t.ram_copy_s_per_gib, f"copy {model}", busy=False)
            self.w.count(f"{model} from RAM")
        else:
            self.w.spend(self.w.jitter(size / t.disk_gib_per_s, t.load_jitter),
                         f"load {model}", busy=False)
            self.w.count(f"{model} from disk")
            self.ram.add(model)
        self.vram.add(model)

    def _sample(self, shot: Shot, steps: int) -> None:
        n = tokens(SPEC, shot.frames, shot.width, shot.height)
        for _ in range(steps):
            self.w.spend(self.w.jitter(_A * n + _B * n * n, self.w.truth.step_jitter),
                         "sample", busy=True)

    def _encode(self) -> None:
        self._load("text_encoder")
        self.w.spend(self.w.truth.encode_s, "encode", busy=True)

    def _decode(self, shot: Shot) -> None:
        self._load("vae")
        self.w.spend(0.38 + 5.98e-8 * shot.frames * shot.width * shot.height, "decode",
                     busy=True)

    def _prompt(self) -> None:
        self.w.spend(self.w.truth.prompt_overhead_s, "prompt", busy=False)

    def _done(self, shot: Shot, out: Path, t0: float) -> ClipResult:
        out.write_bytes(b"simulated clip")
        return ClipResult(out, shot.frames, shot.fps, shot.width, shot.height,
                          self.w.t - t0, self.name, False)

    def render(self, shot: Shot, out_path: Path,
               progress: ProgressCallback | None = None) -> ClipResult:
        t0 = self.w.t
        keep_both = True
        if self.broker is not None:
            p = self.broker.plan(shot.frames, shot.width, shot.height, shot.id)
            keep_both = p.decision("experts").action in ("keep-both-experts", "one-prompt")
        self._encode()
        self._load("high")
        self._sample(shot, self.steps[0])
        if not keep_both:  # staged: the high-noise expert goes before the low pass
            self._prompt()
            self.vram.discard("high")
        self._load("low")
        self._sample(shot, self.steps[1])
        if not keep_both:
            self._prompt()
        self._decode(shot)
        self._prompt()
        return self._done(shot, out_path, t0)

    def check_shots(self, shots: list[Shot]) -> None:
        return None

    def pass_major_refusal(self, shots: int) -> str | None:
        return None  # the simulated server keeps every stage's outputs

    def can_pass_major(self) -> bool:
        return True

    def render_pass_major(self, shots: list[Shot], out_paths: list[Path],
                          progress: ProgressCallback | None = None) -> list[ClipResult]:
        t0 = self.w.t
        for s in shots:
            self._encode()
            self._load("high")
            self._sample(s, self.steps[0])
            self._prompt()
        self.vram.clear()
        for s in shots:
            self._load("low")
            self._sample(s, self.steps[1])
            self._prompt()
        self.vram.clear()
        for s in shots:
            self._decode(s)
            self._prompt()
        return [self._done(s, o, t0) for s, o in zip(shots, out_paths, strict=True)]

    def free(self) -> None:
        self.vram.clear()
        self.ram.clear()

    def after_shot(self, shot: Shot) -> None:
        if self.broker is not None:
            self.broker.between_shots(shot.scene_index, shot.id, self.free, None)

    def close(self) -> None:
        return None


class SimMonitor:
    """The card as the broker reads it: the LLM's share plus the engine's resident models."""

    def __init__(self, world: World, engine: SimEngine) -> None:
        self.w, self.engine = world, engine

    @property
    def available(self) -> bool:
        return True

    def describe(self) -> str:
        return f"simulated {self.w.truth.card_gib:.0f} GiB card"

    def read(self) -> GpuReading:
        total = int(self.w.truth.card_gib * GIB)
        llm = SimLLMControl(self.w).gpu_gib()
        used = min(total, int((self.engine.used_gib() + llm + 0.55) * GIB))
        return GpuReading(0, "sim", total, used, total - used, ())


class SimNight:
    """The world of `flows.night` with a virtual clock."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.engine_ = SimEngine(world)
        self.progress_text: list[str] = []
        self.eta_text: list[list[str]] = []

    def clock(self) -> float:
        return self.w.t

    def open_llm(self, settings: Settings, log_dir: Path) -> SimLLMSession:
        return SimLLMSession(self.w)

    def engine(self, idea: Idea) -> VideoEngine:
        return self.engine_

    @contextlib.contextmanager
    def gpu(self, settings: Settings, engine: VideoEngine, out_dir: Path,
            llm: LLMControl | None) -> Iterator[GpuSession]:
        broker = Broker(SimMonitor(self.w, self.engine_), CostModel.for_model("wan2.2-14b"),
                        budget_gib=self.w.truth.card_gib, llm=llm)
        broker.sleep = lambda s: self.w.spend(s, "leak check", busy=False)  # virtual clock
        self.engine_.broker = broker
        yield GpuSession(broker, VramSampler(NoGpuMonitor("simulated")))

    def assemble(self, idea: Idea, records: list[dict[str, Any]], run_info: dict[str, Any],
                 gpu: GpuSession | None) -> str:
        folder = idea.folder
        if not _assembled(folder, records):
            frames = sum(int(r["frames"]) for r in records)
            self.w.spend(self.w.jitter(1.0 + 0.01 * frames, 0.1), "assemble", busy=False)
            folder.final_path.write_bytes(b"simulated video")
            write_json_atomic(folder.manifest_path, {"shots": records})
        return str(folder.final_path)

    def progress(self, text: str, share: float) -> None:
        self.progress_text.append(text)

    def publish_eta(self, lines: list[str], eta: Any) -> None:
        self.eta_text.append(lines)

    def close(self) -> None:
        return None


# -- the benchmark -----------------------------------------------------------------------------

def sim_settings(out: Path, truth: Truth) -> dict[str, Any]:
    """The batch's settings: Wan 2.2 A14B T2V (lightx2v, 2+2 steps), the card's budget."""
    out.mkdir(parents=True, exist_ok=True)
    toml = out / "sim.toml"
    toml.write_text(f'engine = "comfyui"\n[comfyui]\nworkflow = "wan22_14b_t2v"\n'
                    f'[broker]\nbudget_gib = {truth.card_gib}\nllm_gib = {truth.llm_gib}\n')
    return {"engine": "comfyui", "output_dir": str(out), "config_file": str(toml),
            "llm": {"backend": "lmstudio", "model": "sim-14b"}}


def batch_of(n: int, prefix: str = "idea") -> ParsedBatch:
    lines = [json.dumps({"idea": f"{prefix} {i}: a lighthouse keeper and whale number {i}"})
             for i in range(n)]
    return parse_batch_text("\n".join(lines), "jsonl")


def run_mode(n: int, stage_major: bool, out: Path, seed: int = 7) -> dict[str, Any]:
    """One simulated night of n ideas (of 3 scenes, 12 s each); its numbers."""
    world = World(rng=random.Random(seed))
    env: NightEnv = SimNight(world)
    parsed = batch_of(n)
    common = sim_settings(out, world.truth)
    nights = [parsed] if stage_major else [ParsedBatch([e], []) for e in parsed.entries]
    predicted = 0.0
    done = 0
    for i, p in enumerate(nights):
        opts = NightOptions(name=f"sim-{i}", out_dir=out)
        result, eta = run_night(p, 3, 12.0, common, opts, env)
        predicted += eta.total_s
        done += len(result["done"])
    total = world.t
    disk = {k.removesuffix(" from disk"): v for k, v in world.loads.items()
            if k.endswith("from disk")}
    return {"ideas": n, "mode": "stage by stage" if stage_major else "idea by idea",
            "videos": done, "total_s": round(total, 1),
            "gpu_idle_s": round(world.gpu_idle_s(), 1),
            "llm_loads": world.loads.get("llm", 0), "loads_from_disk": disk,
            "reloads_from_ram": {k.removesuffix(" from RAM"): v for k, v in world.loads.items()
                                 if k.endswith("from RAM")},
            "eta_s": round(predicted, 1),
            "eta_error": round((predicted - total) / total, 4) if total else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ideas", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    from prefect import flow
    from prefect.logging import disable_run_logger

    @flow(name="night-sim")
    def sim(n: int, stage_major: bool, out: str) -> dict[str, Any]:
        return run_mode(n, stage_major, Path(out))

    rows = []
    with disable_run_logger():
        for n in args.ideas:
            for stage_major in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    row = sim(n, stage_major, tmp)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\nideas  mode             videos  total h  GPU idle min  LLM loads  expert loads "
          "(disk)  ETA error")
    for r in rows:
        d = r["loads_from_disk"]
        print(f"{r['ideas']:5}  {r['mode']:15}  {r['videos']:6}  {r['total_s'] / 3600:7.2f}  "
              f"{r['gpu_idle_s'] / 60:12.1f}  {r['llm_loads']:9}  "
              f"{d.get('high', 0) + d.get('low', 0):19}  {100 * r['eta_error']:+8.1f}%")
    for n in args.ideas:
        a, b = (next(r for r in rows if r["ideas"] == n and r["mode"] == m)
                for m in ("idea by idea", "stage by stage"))
        print(f"{n} ideas: stage by stage takes {b['total_s'] / a['total_s']:.3f}x the time "
              f"of idea by idea, {b['gpu_idle_s'] / max(a['gpu_idle_s'], 1e-9):.2f}x its GPU "
              f"idle time, {b['llm_loads']} LLM load(s) instead of {a['llm_loads']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
