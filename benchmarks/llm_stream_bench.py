"""Structured replies streamed (how the backend reads them now, to bound their time and size)
against the same requests answered in one body (how it read them before): seconds per reply
and whether the two texts are identical, on the configured LLM (default: the embedded one).

  python benchmarks/llm_stream_bench.py -n 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prompts
from story_to_video.config import load_settings
from story_to_video.llm import open_llm
from story_to_video.models import Bible

STORY = ("Mara keeps the lighthouse on a cold island. Each night a whale sings below the "
         "rocks. One winter the lamp fails, and the whale's song guides a lost boat home.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    settings = load_settings()
    messages = [{"role": "system", "content": prompts.render("system")},
                {"role": "user", "content": prompts.render("bible", story=STORY, style="noir")}]
    schema = Bible.model_json_schema()
    with open_llm(settings.llm) as llm:
        print(f"backend: {llm.description}", flush=True)
        llm.complete_json(messages, schema, max_tokens=700, temperature=0)  # settle the mode
        fmt = {"type": "json_object", "schema": schema} \
            if llm.structured_mode == "json_object_schema" else \
            {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        streamed, whole, same = [], [], 0
        for i in range(args.n):
            t = time.monotonic()
            a = llm.complete_json(messages, schema, max_tokens=700, temperature=0).text
            streamed.append(time.monotonic() - t)
            t = time.monotonic()
            resp = llm._client.chat.completions.create(  # the pre-streaming path
                model=llm.model(), messages=messages,  # type: ignore[arg-type]
                max_tokens=700, temperature=0, extra_body={"response_format": fmt})
            whole.append(time.monotonic() - t)
            b = resp.choices[0].message.content or ""
            same += a == b
            print(f"round {i + 1}: streamed {streamed[-1]:.2f}s, one body {whole[-1]:.2f}s, "
                  f"{len(a)} chars, identical {a == b}", flush=True)
    print(f"median seconds per reply: streamed {statistics.median(streamed):.2f}, one body "
          f"{statistics.median(whole):.2f}; identical texts {same}/{args.n}")


if __name__ == "__main__":
    main()
