"""Calibrate the night's time model on real ComfyUI clips and print its error on held-out sizes.

Input: what `benchmarks/comfyui_gpu.py` measured on the GPU machine (`benchmarks/results/`):
- cold clips: the soak's prompts after a /free (log lines "soak i WxHxF: S s"), each
  paying its model loads, encode, sampling, decode and the prompt's overhead;
- warm clips: clips 2 and 3 of the one-prompt batches with ComfyUI's dynamic VRAM and no
  LLM beside it, models kept from the clip before.
The fit: three factors of the time model by least squares on the training sizes, `load`
(the models' loads here against the 2.5 GiB/s disk assumption; on the GPU machine the
weights sit in the page cache), `sample` (sampling and decode against the anchors) and
`overhead` (what a prompt costs besides: queueing, saving the clip).
The held-out sizes are then predicted, not fitted, and the error printed. `--out` writes
the calibrated model where a night reads it (`<output>/.time-model.json`).

    python benchmarks/calibrate_time.py --results benchmarks/results \\
        --hold-out 480x832x49 1280x720x33
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resource_broker.time_model import EngineProfile, TimeModel  # noqa: E402

PROFILE = EngineProfile("comfyui", "wan2.2-14b", steps=(2, 2))  # the benchmark's 4 steps
LONG = EngineProfile("comfyui", "wan2.2-14b", steps=(20, 20))
# " warm": soak30-keep.log's label for prompts after a /free without unload, which were cold
# all the same (ComfyUI 0.33 unloads on any /free with free_memory); the soak now sends none
# between its unloads and says "models kept" of the prompts that really kept them.
SOAK = re.compile(r"soak \d+ (\d+)x(\d+)x(\d+)(?: warm)?: ([\d.]+)s")
Size = tuple[int, int, int]  # width, height, frames


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


def parts(tm: TimeModel, size: Size, cold: bool, profile: EngineProfile = PROFILE
          ) -> tuple[float, float, float, float]:
    """(loads, sampling + decode, prompt overhead, encode) seconds of one clip under `tm`."""
    w, h, f = size
    s = tm.shot_seconds(profile, f, w, h)
    return (tm.load_seconds(profile) if cold else 0.0, s["sample"] + s["decode"],
            s["overhead"], s["encode"])


def fit(tm: TimeModel, data: list[tuple[Size, bool, float]]) -> tuple[float, float, float]:
    """Least squares of y - encode = k_load * loads + k_sample * work + k_overhead * overhead."""
    import numpy as np

    rows = [(parts(tm, size, cold), y) for size, cold, y in data]
    a = np.array([p[:3] for p, _y in rows])
    b = np.array([y - p[3] for p, y in rows])
    if np.linalg.matrix_rank(a) < 3:
        raise SystemExit("the training clips cannot tell loads, sampling and overhead "
                         "apart: add cold and warm clips of several sizes")
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(k[0]), float(k[1]), float(k[2])


def calibrated(k: tuple[float, float, float]) -> TimeModel:
    return TimeModel(scale={"load": k[0], "sample": k[1], "decode": k[1], "overhead": k[2]})


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
        print(f"{'x'.join(map(str, size)):12}  {len(ys):5}  warm  {y:10.1f}  "
              f"calibrated {c:.1f}  {100 * (c - y) / y:+5.0f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--hold-out", nargs="+", default=["480x832x49", "1280x720x33"],
                    help="sizes WxHxF predicted, not fitted")
    ap.add_argument("--out", type=Path, help="write the calibrated time model (JSON)")
    args = ap.parse_args()

    held = {tuple(int(x) for x in s.split("x")) for s in args.hold_out}
    clips = [(size, True, y) for size, ys in cold_clips(args.results).items() for y in ys]
    clips += [(size, False, y) for size, ys in warm_clips(args.results).items() for y in ys]
    if not clips:
        raise SystemExit(f"no measured clips in {args.results}")
    train = [c for c in clips if c[0] not in held]
    anchors = TimeModel()
    k = fit(anchors, train)
    tm = calibrated(k)
    print(f"fitted on {len(train)} clips: loads x{k[0]:.2f} ({tm.load_seconds(PROFILE):.1f} s "
          f"a set, {anchors.load_seconds(PROFILE):.1f} s at 2.5 GiB/s), sampling and decode "
          f"x{k[1]:.2f} of the anchors, per-prompt overhead x{k[2]:.2f} "
          f"({parts(tm, (832, 480, 81), False)[2]:.1f} s a clip)")
    print("\nsize         clips  kind  held out  measured s  anchors s  error  calibrated s"
          "  error")
    errors: dict[bool, list[float]] = {True: [], False: []}
    groups: dict[tuple[Size, bool], list[float]] = defaultdict(list)
    for size, cold, y in clips:
        groups[(size, cold)].append(y)
    for (size, cold), ys in sorted(groups.items()):
        y = sum(ys) / len(ys)
        a, c = predict(anchors, size, cold), predict(tm, size, cold)
        out = size in held
        errors[out].append(abs(c - y) / y)
        print(f"{'x'.join(map(str, size)):12}  {len(ys):5}  {'cold' if cold else 'warm':4}  "
              f"{'yes' if out else 'no':8}  {y:10.1f}  {a:9.1f}  {100 * (a - y) / y:+5.0f}%  "
              f"{c:12.1f}  {100 * (c - y) / y:+5.0f}%")
    print_mean_errors(errors)
    print_unfitted("less than 32 GiB free (ComfyUI streams part of the weights)",
                   warm_clips(args.results, None), tm, PROFILE)
    print_unfitted("20+20 steps without the 4-step LoRA (32 GiB free)",
                   warm_clips(args.results, 32.0, "20+20"), tm, LONG)
    if args.out:
        tm.save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
