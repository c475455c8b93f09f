"""Calibrate the night's time model on real ComfyUI clips and print its error on held-out sizes.

Input: what `benchmarks/comfyui_gpu.py` measured on the GPU machine (`benchmarks/results/`):
- cold clips: the soak's prompts after a /free (log lines "soak i WxHxF: S s"), each
  paying its model loads, encode, sampling, decode and the prompt's overhead;
- warm clips: clips 2 and 3 of the one-prompt batches with ComfyUI's dynamic VRAM and no
  LLM beside it, models kept from the clip before; 4 steps (2+2 with the LoRA) and 20+20.
  The 20+20 clips are what tells the sampling apart from the per-prompt overhead: with
  4 steps only, the fit put part of the steps into the overhead and came out 19% short on
  20+20 clips.
The fit: four factors of the time model by least squares on the training sizes, `load`
(the models' loads here against the 2.5 GiB/s disk assumption; on the GPU machine the
weights sit in the page cache), the two terms of a sampling step against the anchors (per
token and per token squared: the attention; one scale for both came out 17% short on a
held-out 20+20 size, the small shots' steps costing relatively more) and `overhead` (what a
prompt costs besides: queueing, saving the clip). The decode's seconds are fitted first, on
their own: the VAE's working time in the `--vram` runs traced with torch's peak counter
(`vram-*.json`), a base and a figure per pixel-frame; the encode keeps the anchors' 0.5 s.
The held-out sizes are then predicted, not fitted, and the error printed; `WxHxF` holds out
a size at every step count, `WxHxF:20+20` at that count only. `--out` writes the calibrated
model where a night reads it (`<output>/.time-model.json`).

    python benchmarks/calibrate_time.py --results benchmarks/results \\
        --hold-out 480x832x49 1280x720x33 832x480x33:20+20
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.traces import Size, decode_trace, dims, name, peak_counter, vram_rows  # noqa: E402
from resource_broker.time_model import EngineProfile, TimeModel  # noqa: E402

PROFILE = EngineProfile("comfyui", "wan2.2-14b", steps=(2, 2))  # the benchmark's 4 steps
LONG = EngineProfile("comfyui", "wan2.2-14b", steps=(20, 20))
# " warm": soak30-keep.log's label for prompts after a /free without unload, which were cold
# all the same (ComfyUI 0.33 unloads on any /free with free_memory); the soak now sends none
# between its unloads and says "models kept" of the prompts that really kept them.
SOAK = re.compile(r"soak \d+ (\d+)x(\d+)x(\d+)(?: warm)?: ([\d.]+)s")
PROFILES = {"4": PROFILE, "20+20": LONG}
Clip = tuple[Size, bool, str, float]  # size, cold, steps, seconds


def cold_clips(results: Path) -> dict[Size, list[float]]:
    found: dict[Size, list[float]] = defaultdict(list)
    for log in sorted(results.glob("soak*.log")):
        for m in SOAK.finditer(log.read_text()):
            w, h, f, s = m.groups()
            found[(int(w), int(h), int(f))].append(float(s))
    return found


def warm_clips(results: Path, free_gib: float | None = 32.0, steps: str = "4"
               ) -> dict[Size, list[float]]:
    """Warm one-prompt clips with `free_gib` free (None: with less than 32 GiB free)."""
    found: dict[Size, list[float]] = defaultdict(list)
    for path in sorted(results.glob("*.json")):
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except (ValueError, AttributeError):
            continue
        for r in rows:
            if (r.get("strategy") in ("comfyui-alone", "one-prompt", "auto")
                    and r.get("dynamic") == 1 and not r.get("llm_gib")
                    and r.get("steps") == steps and not r.get("error")
                    and (r.get("free_gib") == free_gib if free_gib is not None
                         else r.get("free_gib", 32.0) < 32.0)):
                found[(r["width"], r["height"], r["frames"])] += r["clip_s"][1:]
    return found


def decode_runs(results: Path) -> list[tuple[Size, float]]:
    """Seconds the VAE worked in each decode traced with torch's peak counter: from the first
    to the last sample more than 1 GiB above the low that follows the expert's release (the
    decode's working set is 3 GiB or more; the VAE and the decoded clip stay under 0.7)."""
    found = []
    for r in vram_rows(results):
        traced = decode_trace(r)
        if traced is None or not peak_counter(r):
            continue
        after = traced[1]
        low = min(g for _t, g in after)
        first = next(i for i, (_t, g) in enumerate(after) if g <= low + 0.5)
        hot = [t for t, g in after[first:] if g > low + 1.0]
        if hot:
            found.append((dims(r["size"]), hot[-1] - hot[0]))
    return found


def fit_decode(runs: list[tuple[Size, float]]) -> tuple[float, float]:
    """Least squares of seconds = base + per pixel-frame x pixel-frames (base never below 0)."""
    import numpy as np

    x = np.array([float(np.prod(size)) for size, _s in runs])
    y = np.array([s for _size, s in runs])
    slope, base = np.polyfit(x, y, 1)
    if base < 0:
        slope, base = y.sum() / x.sum(), 0.0
    return float(base), float(slope)


def print_decode(anchors: TimeModel, tm: TimeModel, runs: list[tuple[Size, float]],
                 hold_out: list[str]) -> None:
    print(f"\ndecode, the VAE's working time (torch's peak counter): {tm.decode_base_s:.2f} s + "
          f"{tm.decode_s_per_pixel_frame * 1e9:.1f} ns per pixel-frame (anchors "
          f"{anchors.decode_base_s:.2f} s + {anchors.decode_s_per_pixel_frame * 1e9:.1f} ns)")
    print("size         runs  held out  measured s  anchors s  error  calibrated s  error"
          "  off by")
    errors: dict[bool, list[float]] = {True: [], False: []}
    groups: dict[Size, list[float]] = defaultdict(list)
    for size, sec in runs:
        groups[size].append(sec)
    for size, secs in sorted(groups.items()):
        y = sum(secs) / len(secs)
        a, c = (m.shot_seconds(PROFILE, size[2], size[0], size[1])["decode"]
                for m in (anchors, tm))
        out = name(size) in hold_out
        errors[out].append(abs(c - y) / y)
        print(f"{name(size):12} {len(secs):5}  {'yes' if out else 'no':8}  "
              f"{y:10.2f}  {a:9.2f}  {100 * (a - y) / y:+5.0f}%  {c:12.2f}  "
              f"{100 * (c - y) / y:+5.0f}%  {c - y:+.2f} s")
    print_mean_errors(errors)


Parts = tuple[float, float, float, float, float]


def parts(tm: TimeModel, size: Size, cold: bool, profile: EngineProfile = PROFILE) -> Parts:
    """(loads, the steps' per-token part, their per-token-squared part, prompt overhead,
    encode + decode) seconds of one clip under `tm`."""
    w, h, f = size
    s = tm.shot_seconds(profile, f, w, h)
    lin, quad = tm.step_terms(profile.model, f, w, h)
    steps = sum(profile.steps) * profile.forwards_per_step
    return (tm.load_seconds(profile) if cold else 0.0, steps * lin, steps * quad,
            s["overhead"], s["encode"] + s["decode"])


def fit(tm: TimeModel, data: list[Clip]) -> tuple[float, float, float, float]:
    """Least squares of y - encode - decode = k_load * loads + k_lin * per-token part
    + k_quad * per-token-squared part + k_overhead * overhead."""
    import numpy as np

    rows = [(parts(tm, size, cold, PROFILES[steps]), y) for size, cold, steps, y in data]
    a = np.array([p[:4] for p, _y in rows])
    b = np.array([y - p[4] for p, y in rows])
    if np.linalg.matrix_rank(a) < 4:
        raise SystemExit("the training clips cannot tell loads, sampling and overhead "
                         "apart: add cold and warm clips of several sizes and step counts")
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(k[0]), float(k[1]), float(k[2]), float(k[3])


def calibrated(k: tuple[float, float, float, float], base: TimeModel) -> TimeModel:
    """`base` (the anchors, with the decode fitted) with the clip fit's factors."""
    return replace(base, step_s_per_token=base.step_s_per_token * k[1],
                   step_s_per_token2=base.step_s_per_token2 * k[2],
                   scale={"load": k[0], "overhead": k[3]})


def predict(tm: TimeModel, size: Size, cold: bool, profile: EngineProfile = PROFILE) -> float:
    return sum(parts(tm, size, cold, profile))


def print_mean_errors(errors: dict[bool, list[float]]) -> None:
    """errors[held_out]: relative errors of the training (False) and held-out (True) sizes."""
    for out in (False, True):
        if errors[out]:
            print(f"mean abs error, {'held-out' if out else 'training'} sizes: "
                  f"{100 * sum(errors[out]) / len(errors[out]):.1f}%")


def print_unfitted(what: str, clips: dict[Size, list[float]], tm: TimeModel,
                   profile: EngineProfile) -> None:
    """Warm clips the model was not fitted on, against its prediction."""
    if not clips:
        return
    print(f"\nnot fitted, {what}:")
    for size, ys in sorted(clips.items()):
        y, c = sum(ys) / len(ys), predict(tm, size, False, profile)
        print(f"{name(size):12}  {len(ys):5}  warm  {y:10.1f}  "
              f"calibrated {c:.1f}  {100 * (c - y) / y:+5.0f}%")


def held_out(clip: Clip, hold_out: list[str]) -> bool:
    size = name(clip[0])
    return size in hold_out or f"{size}:{clip[2]}" in hold_out


def measured_clips(results: Path) -> list[Clip]:
    clips: list[Clip] = [(size, True, "4", y) for size, ys in cold_clips(results).items()
                         for y in ys]
    for steps in PROFILES:
        clips += [(size, False, steps, y)
                  for size, ys in warm_clips(results, 32.0, steps).items() for y in ys]
    return clips


def print_table(anchors: TimeModel, tm: TimeModel, clips: list[Clip], hold_out: list[str]
                ) -> None:
    print("\nsize         steps  clips  kind  held out  measured s  anchors s  error  "
          "calibrated s  error")
    errors: dict[bool, list[float]] = {True: [], False: []}
    groups: dict[tuple[Size, str, bool], list[Clip]] = defaultdict(list)
    for clip in clips:
        groups[(clip[0], clip[2], clip[1])].append(clip)
    for (size, steps, cold), group in sorted(groups.items()):
        y = sum(c[3] for c in group) / len(group)
        a, c = (predict(m, size, cold, PROFILES[steps]) for m in (anchors, tm))
        out = held_out(group[0], hold_out)
        errors[out].append(abs(c - y) / y)
        print(f"{name(size):12} {steps:5}  {len(group):5}  "
              f"{'cold' if cold else 'warm':4}  {'yes' if out else 'no':8}  {y:10.1f}  "
              f"{a:9.1f}  {100 * (a - y) / y:+5.0f}%  {c:12.1f}  {100 * (c - y) / y:+5.0f}%")
    print_mean_errors(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--hold-out", nargs="+",
                    default=["480x832x49", "1280x720x33", "832x480x33:20+20"],
                    help="sizes WxHxF (or WxHxF:STEPS) predicted, not fitted")
    ap.add_argument("--out", type=Path, help="write the calibrated time model (JSON)")
    args = ap.parse_args()

    clips = measured_clips(args.results)
    if not clips:
        raise SystemExit(f"no measured clips in {args.results}")
    train = [c for c in clips if not held_out(c, args.hold_out)]
    anchors = TimeModel()
    decodes = decode_runs(args.results)
    base = anchors
    fitted = [r for r in decodes if name(r[0]) not in args.hold_out]
    if fitted:
        b, per = fit_decode(fitted)
        base = replace(anchors, decode_base_s=b, decode_s_per_pixel_frame=per)
    k = fit(base, train)
    tm = calibrated(k, base)
    step = tm.step_seconds("wan2.2-14b", 81, 832, 480)
    print(f"fitted on {len(train)} clips: loads x{k[0]:.2f} ({tm.load_seconds(PROFILE):.1f} s "
          f"a set, {anchors.load_seconds(PROFILE):.1f} s at 2.5 GiB/s), a step's per-token "
          f"part x{k[1]:.2f} and per-token-squared part x{k[2]:.2f} of the anchors "
          f"({step:.2f} s a step at 832x480x81, anchors "
          f"{anchors.step_seconds('wan2.2-14b', 81, 832, 480):.2f}), per-prompt overhead "
          f"x{k[3]:.2f} ({parts(tm, (832, 480, 81), False)[3]:.1f} s a clip)")
    print_table(anchors, tm, clips, args.hold_out)
    if decodes:
        print_decode(anchors, tm, decodes, args.hold_out)
    print_unfitted("less than 32 GiB free (ComfyUI streams part of the weights)",
                   warm_clips(args.results, None), tm, PROFILE)
    if args.out:
        tm.save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
