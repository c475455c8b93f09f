"""Calibrate the broker's VRAM cost model on real ComfyUI and print its error on held-out sizes.

Input: `benchmarks/comfyui_gpu.py --vram` runs (`benchmarks/results/vram-*.json`): one staged
shot per size on ComfyUI's classic loader with the whole card free, the card's used VRAM
sampled every 0.1 s. The stage fitted is the low-noise pass: it runs after a /free that
unloaded everything, so its peak is the card's idle use, one expert and the activations (the
high-noise pass also holds the text encoder, which ComfyUI evicts under pressure; the decode
runs inside memory the allocator kept from the passes, so the card does not show it).

The decode is fitted on what torch itself allocated inside ComfyUI (runs with a `trace`): its
rise inside the decode window above the lowest point before it, because ComfyUI drops the
last expert as the decode prompt begins. Traces from torch's peak counter are used where
there are any: sampled allocation (/system_stats) missed the peaks of the decode's chunks.
The model: VAE weights (bf16, as ComfyUI loads them) + a working set per pixel of one frame
(the anchors' figure, scaled, and a base given two areas) + the decoded clip in bf16.

The model: peak = idle + expert + max(floor, per-token anchor x tokens). The floor is fitted
on the training sizes (the median of what they took above their weights); the per-token
figure keeps the anchors' 0.108 MiB unless training sizes above the floor say otherwise.
Held-out sizes are predicted, not fitted. `--out` writes the calibration where a run reads
it (`<output>/.calibration.json`).

    python benchmarks/calibrate_vram.py --hold-out 832x480x161 1280x720x81
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.calibrate_time import print_mean_errors  # noqa: E402
from benchmarks.traces import decode_trace, dims, peak_counter, vram_rows  # noqa: E402
from resource_broker.cost_model import (  # noqa: E402
    GIB,
    OUT_BYTES_PER_PIXEL_FRAME,
    Calibration,
    CostModel,
    ShotCost,
)
from resource_broker.timeline import Sample, Timeline  # noqa: E402

Point = tuple[str, int, float, float]  # size, tokens, idle GiB, measured low-pass peak GiB
DecodePoint = tuple[str, float, float]  # size, sampling, GiB the decode took (torch)


def shot(model: CostModel, size: str) -> ShotCost:
    w, h, f = dims(size)
    return model.shot(f, w, h)


def points(rows: list[dict[str, Any]], model: CostModel) -> list[Point]:
    return [(r["size"], shot(model, r["size"]).tokens, r["base_used_gib"], r["low_peak_gib"])
            for r in rows if r.get("low_peak_gib")]


def decode_points(rows: list[dict[str, Any]]) -> list[DecodePoint]:
    """(size, how torch was read, rise) per traced decode; only peak-counter traces where the
    results hold any."""
    found = []
    for r in rows:
        traced = decode_trace(r)
        if traced is None:
            continue
        start, samples = traced
        tl = Timeline(samples=[Sample(t, gib, 0.0, "torch") for t, gib in samples])
        found.append((r["size"], "peak" if peak_counter(r) else "sampled", tl.rise_gib(start)))
    peaks = [p for p in found if p[1] == "peak"]
    return peaks or found


def predict_decode(model: CostModel, size: str) -> float:
    c = shot(model, size)
    return (c.vae_weights + c.decode_full) / GIB


def fit_decode(anchors: CostModel, train: list[DecodePoint], cal: Calibration) -> None:
    """The anchors' per-pixel figure scaled (and a base, given two areas or more), on what
    the decode took above the VAE's weights and the decoded clip."""
    pts = []
    for size, _how, gib in train:
        w, h, f = dims(size)
        out = w * h * f * OUT_BYTES_PER_PIXEL_FRAME
        pts.append((float(w * h), int(gib * GIB) - anchors.spec.vae_weight_bytes - out))
    if pts:
        cal.fit("vae", pts, anchors.spec.vae_bytes_per_frame_pixel)


def print_decode(anchors: CostModel, tuned: CostModel, data: list[DecodePoint],
                 hold_out: list[str]) -> None:
    if not data:
        print("\ndecode: no run with a torch trace (comfyui_gpu.py --vram records one)")
        return
    print(f"\ndecode (torch's own allocation), fitted: base {tuned.calibration.vae_base / GIB:.2f}"
          f" GiB + x{tuned.calibration.vae_scale:.2f} of the anchors' "
          f"{anchors.spec.vae_bytes_per_frame_pixel / 1000:.1f} KB per pixel of a frame + "
          f"{OUT_BYTES_PER_PIXEL_FRAME} B per pixel-frame for the decoded clip")
    print("size          torch read  held out  measured GiB  anchors GiB  error  "
          "calibrated GiB  error")
    for size, how, gib in data:
        a, c = predict_decode(anchors, size), predict_decode(tuned, size)
        print(f"{size:12}  {how:10}  {'yes' if size in hold_out else 'no':8}  {gib:12.2f}  "
              f"{a:11.2f}  {100 * (a - gib) / gib:+5.1f}%  {c:14.2f}  "
              f"{100 * (c - gib) / gib:+5.1f}%")
    if not any(size in hold_out for size, _how, _g in data):
        print("no held-out decode size yet: the decode's error is not tested")


def predict(model: CostModel, size: str, idle: float) -> float:
    c = shot(model, size)
    return idle + (c.expert + c.activations) / GIB


def fit(anchors: CostModel, train: list[Point]) -> Calibration:
    """Floor: the median of the training runs' activations as measured (every run, repeated
    sizes included). The per-token scale moves only on runs whose measured activations lie
    above that floor."""
    expert = anchors.spec.expert_bytes / GIB
    measured = [(n, peak - idle - expert) for _size, n, idle, peak in train]
    cal = Calibration(act_floor=int(statistics.median(m for _n, m in measured) * GIB))
    above = [(float(n), int(m * GIB)) for n, m in measured
             if m * GIB > cal.act_floor and n * anchors.spec.act_bytes_per_token > cal.act_floor]
    if above:
        cal.fit("act", above, anchors.spec.act_bytes_per_token)
    cal.samples = len(train)
    return cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--model", default="wan2.2-14b")
    ap.add_argument("--hold-out", nargs="+", default=["832x480x161", "1280x720x81"],
                    help="sizes WxHxF predicted, not fitted")
    ap.add_argument("--out", type=Path, help="write the calibration (JSON)")
    args = ap.parse_args()

    anchors = CostModel.for_model(args.model)
    rows = list(vram_rows(args.results))
    data = points(rows, anchors)
    if not data:
        raise SystemExit(f"no vram-*.json rows in {args.results}: run comfyui_gpu.py --vram")
    train = [p for p in data if p[0] not in args.hold_out]
    if not train:
        raise SystemExit("every measured size is held out: nothing to fit on")
    cal = fit(anchors, train)
    decodes = decode_points(rows)
    fit_decode(anchors, [d for d in decodes if d[0] not in args.hold_out], cal)
    tuned = CostModel.for_model(args.model, cal)
    print(f"fitted on {len(train)} shots: floor {cal.act_floor / GIB:.2f} GiB above the "
          f"weights, per-token x{cal.act_scale:.2f} of the anchors' "
          f"{anchors.spec.act_bytes_per_token / 2**20:.3f} MiB, base "
          f"{cal.act_base / GIB:.2f} GiB")
    print("\nsize          tokens  held out  measured GiB  anchors GiB  error  calibrated GiB"
          "  error")
    errors: dict[bool, list[float]] = {True: [], False: []}
    for size, n, idle, peak in data:
        a, c = predict(anchors, size, idle), predict(tuned, size, idle)
        out = size in args.hold_out
        errors[out].append(abs(c - peak) / peak)
        print(f"{size:12}  {n:6}  {'yes' if out else 'no':8}  {peak:12.2f}  {a:11.2f}  "
              f"{100 * (a - peak) / peak:+5.1f}%  {c:14.2f}  {100 * (c - peak) / peak:+5.1f}%")
    print_mean_errors(errors)
    print_decode(anchors, tuned, decodes, args.hold_out)
    if args.out:
        cal.save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
