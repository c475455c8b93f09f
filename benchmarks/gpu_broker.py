"""Reproduce the seeds' situation on a real GPU and compare VRAM strategies side by side.

Wan 2.2 A14B architecture at full size (diffusers' WanTransformer3DModel defaults: 40 blocks,
dim 5120) with random weights stored in fp8 e4m3fn and upcast per layer (what ComfyUI users'
13.6 GB fp8 files hold), two experts, the Wan 2.1 VAE, a VRAM budget emulated on a bigger
card (torch's per-process memory cap), clips of 33, 81 and 161 frames at 832x480.

Strategies, run one after another on the same clips, each clip timed in steady state (the
state the previous clip of that strategy left behind, as in a batch):
  both-resident   the seeds' baseline: both experts stay loaded. What does not fit the budget
                  "spills": those weight bytes stay in host RAM and are copied in for every
                  forward with no overlap, as the driver's system-memory fallback does
                  (a lower bound on its cost: the real fallback reads over PCIe in place).
  unload-between  the seeds' fix: unload the high-noise expert before the low-noise pass,
                  reload it for the next clip.
  broker          what resource_broker.policy.plan_shot decides for the clip and budget.

Prints seconds per clip, peak VRAM, spilled GiB, ratios to the baseline and the cost model's
prediction error; writes the same as JSON. Needs torch + diffusers (extra `gpu-bench`).

  python benchmarks/gpu_broker.py --budget-gib 32 --frames 33 81 161 --out results.json
  python benchmarks/gpu_broker.py --tiny          # CPU smoke test of the code paths
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Less fragmentation, so reserved memory tracks what is really needed (set before torch).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resource_broker.cost_model import GIB, OUT_BYTES_PER_PIXEL_FRAME, CostModel, latent_frames
from resource_broker.policy import plan_shot

STEPS_HIGH, STEPS_LOW = 2, 2  # lightx2v-style 4 steps, cfg 1: one forward per step


class FP8Linear(nn.Module):
    """Weight stored in float8_e4m3fn, upcast to the activation dtype per call."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().to(torch.float8_e4m3fn),
                                   requires_grad=False)
        self.bias = (nn.Parameter(lin.bias.detach(), requires_grad=False)
                     if lin.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def to_fp8(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear(child))
        else:
            to_fp8(child)


class HostBacked:
    """A module whose tensors live in pinned host RAM and are copied to the GPU on demand."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.tensors = [p for p in module.parameters()] + [b for b in module.buffers()]
        self.host = [t.detach().to("cpu").pin_memory() if device.type == "cuda"
                     else t.detach().to("cpu").clone() for t in self.tensors]
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)
        self.loaded = False
        self.unload()

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        if self.loaded:
            return
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            for t, h in zip(self.tensors, self.host, strict=True):
                t.data = h.to(self.device, non_blocking=True)
                if stream is not None:  # used on the main stream: free only after it
                    t.data.record_stream(torch.cuda.default_stream(self.device))
        self.loaded = True

    def unload(self) -> None:
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h
        self.loaded = False


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class Expert:
    """One Wan expert: resident blocks, plus `swapped` blocks streamed from host RAM."""

    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name, self.model, self.device = name, model, device
        blocks = list(model.blocks)
        self.blocks = [HostBacked(b, device) for b in blocks]
        block_ids = {id(p) for b in blocks for p in b.parameters()}
        self.rest = _RestOf(model, block_ids, device)
        self.swapped: set[int] = set()
        self.prefetch = False
        self.stream = torch.cuda.Stream() if device.type == "cuda" else None
        self.events: dict[int, Any] = {}
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(self._pre(i))
            b.register_forward_hook(self._post(i))
        self.copy_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks) + self.rest.nbytes

    @property
    def block_bytes(self) -> int:
        return self.blocks[0].nbytes

    def load(self, swapped: int = 0, prefetch: bool = True) -> float:
        """Make the expert resident except its first `swapped` blocks; returns copy seconds."""
        t = time.perf_counter()
        self.swapped = set(range(swapped))
        self.prefetch = prefetch
        self.rest.load()
        for i, b in enumerate(self.blocks):
            if i in self.swapped:
                b.unload()
            else:
                b.load()
        _sync(self.device)
        return time.perf_counter() - t

    def unload(self) -> None:
        for b in self.blocks:
            b.unload()
        self.rest.unload()
        _free(self.device)

    @property
    def resident(self) -> bool:
        return self.rest.loaded

    def _pre(self, i: int) -> Any:
        def hook(_m: nn.Module, _a: Any) -> None:
            if i not in self.swapped:
                return
            if i in self.events:
                torch.cuda.current_stream().wait_event(self.events.pop(i))
            elif not self.blocks[i].loaded:
                t = time.perf_counter()
                self.blocks[i].load()  # synchronous: no overlap
                _sync(self.device)
                self.copy_seconds += time.perf_counter() - t
            nxt = i + 1
            if self.prefetch and nxt in self.swapped and self.stream is not None:
                self.blocks[nxt].load(self.stream)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self.events[nxt] = ev
        return hook

    def _post(self, i: int) -> Any:
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            if i in self.swapped:
                self.blocks[i].unload()
        return hook


class _RestOf(HostBacked):
    """Everything of an expert that is not a transformer block (embeddings, head)."""

    def __init__(self, model: nn.Module, skip: set[int], device: torch.device) -> None:
        self.module, self.device = model, device
        self.tensors = [p for p in model.parameters() if id(p) not in skip]
        self.host = [t.detach().to("cpu").pin_memory() if device.type == "cuda"
                     else t.detach().to("cpu").clone() for t in self.tensors]
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)
        self.loaded = False
        self.unload()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Rig:
    device: torch.device
    high: Expert
    low: Expert
    vae: Any
    text: torch.Tensor
    tiny: bool
    context_bytes: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)


def build(tiny: bool, device: torch.device) -> Rig:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    cfg: dict[str, Any] = {}
    if tiny:
        cfg = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 4,
               "ffn_dim": 64, "text_dim": 32, "freq_dim": 32}
    experts = []
    for name in ("high", "low"):
        with torch.device(device):
            m = WanTransformer3DModel(**cfg).to(torch.bfloat16).eval()
        to_fp8(m.blocks)  # fp8 files store the blocks' linear weights in fp8
        experts.append(Expert(name, m, device))
        _free(device)
    vae_cfg = {"base_dim": 16, "z_dim": 16} if tiny else {}
    vae = AutoencoderKLWan(**vae_cfg).to(device, torch.bfloat16).eval()
    text_dim = 32 if tiny else 4096
    text = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)
    return Rig(device, experts[0], experts[1], vae, text, tiny)


def forward(rig: Rig, expert: Expert, latents: torch.Tensor) -> torch.Tensor:
    t = torch.tensor([500], device=rig.device)
    with torch.inference_mode():
        out = expert.model(hidden_states=latents, timestep=t, encoder_hidden_states=rig.text,
                           return_dict=False)[0]
    return out  # type: ignore[no-any-return]


def decode(rig: Rig, latents: torch.Tensor, tiled: bool) -> None:
    if tiled:
        rig.vae.enable_tiling()
    else:
        rig.vae.disable_tiling()
    with torch.inference_mode():
        rig.vae.decode(latents, return_dict=False)


@dataclass
class Plan:
    keep_both: bool
    swapped_blocks: int
    prefetch: bool
    unload_before_decode: str  # "none", "high" or "all"
    tiled: bool
    spilled_bytes: int = 0


def baseline_plan(rig: Rig, cost: CostModel, frames: int, w: int, h: int, budget: int) -> Plan:
    c = cost.shot(frames, w, h)
    resident_need = 2 * rig.high.nbytes + c.vae_weights + c.context
    worst = resident_need + max(c.activations, c.decode_full)
    spill = max(0, worst - budget + int(0.5 * GIB))  # allocator slack
    blocks = math.ceil(spill / 2 / rig.high.block_bytes) if spill > 0 else 0  # per expert
    return Plan(True, blocks, False, "none", False, 2 * blocks * rig.high.block_bytes)


def fixed_unload_plan() -> Plan:
    return Plan(False, 0, True, "none", False)


def broker_plan(rig: Rig, cost: CostModel, frames: int, w: int, h: int,
                budget_gib: float) -> tuple[Plan, dict[str, Any]]:
    p = plan_shot(cost, frames, w, h, budget_gib=budget_gib, margin_gib=0.75)
    exp, dec = p.decision("experts"), p.decision("decode")
    swapped = int(exp.params.get("blocks_to_swap", 0))
    plan = Plan(exp.action == "keep-both-experts", swapped, True,
                str(dec.params.get("unload", "none")), "tiled" in dec.action)
    return plan, p.to_json()


def _peak_and_reset(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    return int(peak)


def run_clip(rig: Rig, plan: Plan, frames: int, w: int, h: int) -> dict[str, Any]:
    dev = rig.device
    lat = torch.randn(1, 16, latent_frames(frames), h // 8, w // 8, device=dev,
                      dtype=torch.bfloat16)
    _free(dev)
    _peak_and_reset(dev)
    stage: dict[str, int] = {}
    rig.high.copy_seconds = rig.low.copy_seconds = 0.0
    t0 = time.perf_counter()
    loads = 0.0
    if not plan.keep_both:
        rig.low.unload()  # ComfyUI evicts the other expert to load this one
    if not (plan.keep_both and rig.high.resident):
        loads += rig.high.load(plan.swapped_blocks, plan.prefetch)
    for _ in range(STEPS_HIGH):
        lat = forward(rig, rig.high, lat)
    _sync(dev)
    stage["high"] = _peak_and_reset(dev)
    if not plan.keep_both:
        rig.high.unload()
    _free(dev)
    _peak_and_reset(dev)
    if not rig.low.resident:
        loads += rig.low.load(plan.swapped_blocks, plan.prefetch)
    for _ in range(STEPS_LOW):
        lat = forward(rig, rig.low, lat)
    _sync(dev)
    stage["low"] = _peak_and_reset(dev)
    if plan.unload_before_decode in ("high", "all"):
        rig.high.unload()
    if plan.unload_before_decode == "all":
        rig.low.unload()
    _free(dev)  # ComfyUI empties the allocator cache between stages (soft_empty_cache)
    _peak_and_reset(dev)
    decode(rig, lat, plan.tiled)
    _sync(dev)
    stage["decode"] = _peak_and_reset(dev)
    seconds = time.perf_counter() - t0
    ctx = rig.context_bytes
    return {"seconds": round(seconds, 2), "load_seconds": round(loads, 2),
            "swap_copy_seconds": round(rig.high.copy_seconds + rig.low.copy_seconds, 2),
            "peak_gib": round((max(stage.values()) + ctx) / GIB, 2),
            "stage_peaks_gib": {k: round((v + ctx) / GIB, 2) for k, v in stage.items()}}


def calibrate(rig: Rig, cost: CostModel, w: int, h: int, frames: list[int]) -> None:
    """Measure activation and decode peaks at two sizes; fit the cost model to them."""
    dev = rig.device
    act_pts, vae_pts = [], []
    rig.low.load()
    for f in frames:
        lat = torch.randn(1, 16, latent_frames(f), h // 8, w // 8, device=dev,
                          dtype=torch.bfloat16)
        _free(dev)
        base = torch.cuda.memory_reserved() if dev.type == "cuda" else 0
        _peak_and_reset(dev)
        out = forward(rig, rig.low, lat)
        _sync(dev)
        act_pts.append((float(cost.shot(f, w, h).tokens), _peak_and_reset(dev) - base))
        del out
    rig.low.unload()
    for f in frames:
        lat = torch.randn(1, 16, latent_frames(f), h // 8, w // 8, device=dev,
                          dtype=torch.bfloat16)
        _free(dev)
        base = torch.cuda.memory_reserved() if dev.type == "cuda" else 0
        _peak_and_reset(dev)
        decode(rig, lat, False)
        _sync(dev)
        vae_pts.append((float(w * h), _peak_and_reset(dev) - base
                        - f * w * h * OUT_BYTES_PER_PIXEL_FRAME))
        _free(dev)
    cost.calibration.fit("act", act_pts, cost.spec.act_bytes_per_token)
    cost.calibration.fit("vae", vae_pts, cost.spec.vae_bytes_per_frame_pixel)
    print("calibration points (units, bytes): act", act_pts, "vae", vae_pts)
    print("calibration:", cost.calibration, flush=True)


def predicted_peak(rig: Rig, cost: CostModel, plan: Plan, frames: int, w: int, h: int) -> float:
    c = cost.shot(frames, w, h)
    e = rig.high.nbytes
    n = 2 if plan.keep_both else 1
    resident = n * e - n * plan.swapped_blocks * rig.high.block_bytes
    if plan.swapped_blocks and plan.prefetch:
        resident += rig.high.block_bytes  # the prefetch buffer
    sampling = resident + c.activations + c.vae_weights  # this rig keeps the VAE loaded
    dec_resident = {"none": resident, "high": resident // n, "all": 0}[plan.unload_before_decode]
    vae = c.decode_tiled if plan.tiled else c.decode_full
    decoding = dec_resident + c.vae_weights + vae
    return round((max(sampling, decoding) + c.context) / GIB, 2)


def run_steady(rig: Rig, plan: Plan, frames: int, w: int, h: int, spill_more: bool,
               settle: bool) -> dict[str, Any]:
    """The timed clip starts from the residency the previous clip left (as in a batch);
    `settle` runs one untimed clip first. The baseline emulates the driver: on OOM it
    spills two more blocks per expert and tries again."""
    for _ in range(8):
        try:
            if settle:
                run_clip(rig, plan, frames, w, h)
            res = run_clip(rig, plan, frames, w, h)
            res["outcome"] = "ok"
            return res
        except torch.OutOfMemoryError as err:
            rig.high.unload()
            rig.low.unload()
            if not spill_more:
                return {"seconds": None, "peak_gib": None, "outcome": f"OOM: {err}"[:160]}
            plan.swapped_blocks += 2
            plan.spilled_bytes = 2 * plan.swapped_blocks * rig.high.block_bytes
    return {"seconds": None, "peak_gib": None, "outcome": "OOM after 8 spill steps"}


def pass_major_batch(rig: Rig, n: int, frames: int, w: int, h: int) -> dict[str, Any]:
    """n clips pass by pass: every high-noise pass, then every low-noise pass, then every
    decode; each expert is loaded once for the batch. Returns seconds per clip."""
    dev = rig.device
    rig.high.unload()
    rig.low.unload()
    _free(dev)
    lats = [torch.randn(1, 16, latent_frames(frames), h // 8, w // 8, device=dev,
                        dtype=torch.bfloat16) for _ in range(n)]
    t0 = time.perf_counter()
    loads = rig.high.load()
    for i in range(n):
        for _ in range(STEPS_HIGH):
            lats[i] = forward(rig, rig.high, lats[i])
    rig.high.unload()
    loads += rig.low.load()
    for i in range(n):
        for _ in range(STEPS_LOW):
            lats[i] = forward(rig, rig.low, lats[i])
    rig.low.unload()
    _free(dev)
    for lat in lats:
        decode(rig, lat, False)
    _sync(dev)
    total = time.perf_counter() - t0
    return {"clips": n, "seconds_per_clip": round(total / n, 2),
            "load_seconds_total": round(loads, 2)}


def per_clip_batch(rig: Rig, n: int, frames: int, w: int, h: int) -> dict[str, Any]:
    """The same n clips one after another, unloading the high-noise expert before each
    low-noise pass (the seeds' fix): two expert loads per clip."""
    plan = fixed_unload_plan()
    rig.high.unload()
    rig.low.unload()
    t0 = time.perf_counter()
    loads = 0.0
    for _ in range(n):
        loads += run_clip(rig, plan, frames, w, h)["load_seconds"]
    total = time.perf_counter() - t0
    return {"clips": n, "seconds_per_clip": round(total / n, 2),
            "load_seconds_total": round(loads, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pass-major", type=int, default=0, metavar="N",
                    help="also time a batch of N clips pass-major vs clip by clip")
    ap.add_argument("--budget-gib", type=float, default=32.0)
    ap.add_argument("--frames", type=int, nargs="+", default=[33, 81, 161])
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--strategies", nargs="+",
                    default=["both-resident", "unload-between", "broker"])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: smoke test")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.zeros(1, device=device)  # creates the CUDA context
        free0, total = torch.cuda.mem_get_info()
        context = total - free0  # CUDA context + anything else already on the card
    else:
        total, context = 80 * GIB, 0
    rig = build(args.tiny, device)
    rig.context_bytes = context
    vae_bytes = sum(p.numel() * p.element_size() for p in rig.vae.parameters())
    # The cost model as the broker uses it, told the real sizes of what it will run.
    cost = CostModel.for_model("wan2.2-14b").with_expert_bytes(rig.high.nbytes)
    cost = replace(cost, spec=replace(cost.spec, vae_weight_bytes=vae_bytes),
                   context_bytes=context if device.type == "cuda" else cost.context_bytes)
    budget = int(args.budget_gib * GIB)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"expert {rig.high.nbytes / GIB:.2f} GiB ({len(rig.high.blocks)} blocks of "
          f"{rig.high.block_bytes / GIB:.3f}), VAE {vae_bytes / GIB:.2f} GiB, context "
          f"{context / GIB:.2f} GiB, budget {args.budget_gib} GiB", flush=True)

    # Warm-up: kernels and allocator, one small forward per expert.
    warm = Plan(False, 0, True, "all", False)
    run_clip(rig, warm, 5 if args.tiny else 17, args.width if not args.tiny else 64,
             args.height if not args.tiny else 64)
    rig.high.unload()
    rig.low.unload()

    w, h = (64, 64) if args.tiny else (args.width, args.height)
    # Calibrate at sizes the comparison does not use, so its prediction errors are honest.
    calibrate(rig, cost, w, h, [9, 17] if args.tiny else [49, 121])
    if device.type == "cuda":
        # The budget binds the comparison, not the calibration (which measures needs).
        # torch's cap covers its own allocations; the context is outside it.
        torch.cuda.set_per_process_memory_fraction(min(1.0, (budget - context) / total))
    rows = []
    for strategy in args.strategies:
        rig.high.unload()
        rig.low.unload()
        for frames in args.frames:
            broker_json = None
            if strategy == "both-resident":
                plan = baseline_plan(rig, cost, frames, w, h, budget)
            elif strategy == "unload-between":
                plan = fixed_unload_plan()
            else:
                plan, broker_json = broker_plan(rig, cost, frames, w, h, args.budget_gib)
            res = run_steady(rig, plan, frames, w, h, spill_more=strategy == "both-resident",
                             settle=frames == args.frames[0])
            pred = predicted_peak(rig, cost, plan, frames, w, h)
            row = {"frames": frames, "strategy": strategy, **res,
                   "spilled_gib": round(plan.spilled_bytes / GIB, 2),
                   "predicted_gib": pred, "plan": plan.__dict__,
                   "broker": broker_json}
            if res.get("peak_gib"):
                row["prediction_error_pct"] = round(100 * (pred - res["peak_gib"])
                                                    / res["peak_gib"], 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("broker",)}),
                  flush=True)
        rig.high.unload()
        rig.low.unload()
    report(rows, args.budget_gib)
    if args.pass_major:
        f = args.frames[min(1, len(args.frames) - 1)]
        clip = per_clip_batch(rig, args.pass_major, f, w, h)
        major = pass_major_batch(rig, args.pass_major, f, w, h)
        print(f"\nbatch of {args.pass_major} clips at {f} frames: clip by clip "
              f"{clip['seconds_per_clip']} s/clip ({clip['load_seconds_total']} s of expert "
              f"loads); pass-major {major['seconds_per_clip']} s/clip "
              f"({major['load_seconds_total']} s of loads): "
              f"{major['seconds_per_clip'] / clip['seconds_per_clip']:.3f}x", flush=True)
        rows.append({"pass_major": major, "clip_by_clip": clip, "frames": f})
    if args.out:
        args.out.write_text(json.dumps({"budget_gib": args.budget_gib, "rows": rows,
                                        "context_gib": context / GIB,
                                        "expert_gib": rig.high.nbytes / GIB}, indent=1))


def report(rows: list[dict[str, Any]], budget: float) -> None:
    print(f"\n| frames | strategy | s/clip | vs baseline | peak GiB | spilled GiB | "
          f"predicted GiB | pred. error | within {budget:g} GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["frames"]: r["seconds"] for r in rows if r["strategy"] == "both-resident"}
    for r in rows:
        b = base.get(r["frames"])
        ratio = f"{r['seconds'] / b:.2f}" if b and r["seconds"] else "-"
        fits = "yes" if r["peak_gib"] and r["peak_gib"] <= budget and not r["spilled_gib"] \
            else "no (spill)" if r["spilled_gib"] else "no"
        err = f"{r['prediction_error_pct']:+.1f}%" if "prediction_error_pct" in r else "-"
        print(f"| {r['frames']} | {r['strategy']} | {r['seconds']} | {ratio} | "
              f"{r['peak_gib']} | {r['spilled_gib']} | {r['predicted_gib']} | {err} | {fits} |")
    best: dict[int, float] = {}
    for r in rows:
        if r["strategy"] != "broker" and r["seconds"] and not r["spilled_gib"]:
            best[r["frames"]] = min(best.get(r["frames"], 1e9), r["seconds"])
    for r in rows:
        if r["strategy"] == "broker" and r["seconds"] and r["frames"] in best:
            print(f"broker vs best fixed no-spill strategy at {r['frames']} frames: "
                  f"{r['seconds'] / best[r['frames']]:.3f}x")


if __name__ == "__main__":
    main()
