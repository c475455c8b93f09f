"""Plan N ideas against the configured LLM backend and print how robust planning is.

Prints, per structured request (bible, scenes): validity on the first try (before repair),
validity within the allowed tries (after repair), mean tries, plus tokens/s overall.

  python benchmarks/plan_bench.py -n 10                  # the embedded SmolLM2 server
  STV_LLM__BACKEND=lmstudio python benchmarks/plan_bench.py -n 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from story_to_video.config import load_settings
from story_to_video.llm import open_llm
from story_to_video.planner import Planner, PlanningError, plan_from_story

IDEAS = [
    "a lighthouse keeper befriends a lonely whale", "a paper boat sails a flooded city",
    "two robots learn to dance in an abandoned factory", "a fox finds a lantern in the snow",
    "a girl trains a dragon to deliver mail", "an old man plants a forest on Mars",
    "a cat runs a night bakery", "a violinist plays for the northern lights",
    "twins race kites over sand dunes", "a diver discovers a city of glass",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    stats: dict[str, list[int]] = {"bible": [], "scenes": []}
    plans_ok, tokens, seconds = 0, 0, 0.0
    with open_llm(settings.llm) as llm:
        print(f"backend: {llm.description}", flush=True)
        for i in range(args.n):
            idea = IDEAS[i % len(IDEAS)]
            planner = Planner(llm, max_tries=settings.llm.max_repair_tries,
                              temperature=settings.llm.temperature)
            t = time.monotonic()
            try:
                story = planner.write_story(idea, "cinematic", args.scenes)
                plan_from_story(planner, idea=idea, story=story, style="cinematic",
                                scenes=args.scenes, target_seconds=args.seconds,
                                video=settings.video)
                plans_ok += 1
                outcome = "valid"
            except PlanningError as err:
                outcome = f"failed: {str(err)[:100]}"
            for a in planner.attempts:
                tokens += a.tokens
                seconds += a.seconds
                if a.what in stats:
                    # tries used; max_tries + 1 marks "never valid"
                    ok = not (a.errors and len(a.errors) == a.tries)
                    stats[a.what].append(a.tries if ok else settings.llm.max_repair_tries + 1)
            print(f"{i + 1:3d} {idea[:40]:40s} {time.monotonic() - t:6.1f}s {outcome}",
                  flush=True)
    n_max = settings.llm.max_repair_tries
    result = {"n": args.n, "plans_valid": plans_ok, "tokens_per_s": tokens / seconds}
    print("\n| request | valid first try | valid after repair | mean tries |")
    print("|---|---|---|---|")
    for what, tries in stats.items():
        first = sum(t == 1 for t in tries) / len(tries) if tries else 0.0
        after = sum(t <= n_max for t in tries) / len(tries) if tries else 0.0
        mean = sum(min(t, n_max) for t in tries) / len(tries) if tries else 0.0
        result[what] = {"first": first, "after": after, "mean_tries": mean}
        print(f"| {what} | {first:.0%} | {after:.0%} | {mean:.2f} |")
    print(f"\nwhole plans valid: {plans_ok}/{args.n}; {result['tokens_per_s']:.0f} tokens/s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
