"""Record what a REAL ComfyUI says, into tests/fixtures/comfyui/, for the fake to replay.

    .venv/bin/python scripts/record_comfyui_transcripts.py [--url URL]

Without --url it starts a test server with scripts/comfyui_test_server.py. Only cheap graphs
run (no text encoder), except the sampling transcript, which reuses the test suite's prompt
text so a warm server answers the encode from its cache. Paths in the server's command
line are replaced by placeholders so the fixtures do not depend on this machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "comfyui"
# Every class the shipped workflows and the graph surgery use.
CLASSES = ["CLIPLoader", "CLIPTextEncode", "VAELoader", "UNETLoader", "LoraLoaderModelOnly",
           "ModelSamplingSD3", "EmptyHunyuanLatentVideo", "KSamplerAdvanced", "KSampler",
           "VAEDecode", "VAEDecodeTiled", "CreateVideo", "SaveVideo", "SaveLatent",
           "LoadLatent", "LoadImage", "WanImageToVideo", "Wan22ImageToVideoLatent",
           "SaveImage", "ImageScale"]


def cheap_graph(length: int = 5, size: int = 64) -> dict[str, Any]:
    """An empty video latent saved to a file: runs in milliseconds, cacheable, an output."""
    return {"1": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": size, "height": size, "length": length, "batch_size": 1}},
            "2": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["1", 0], "filename_prefix": "transcript/cheap"}}}


def slow_graph() -> dict[str, Any]:
    """A decode that takes a few seconds on the CPU: long enough to read /queue during it."""
    return {"1": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 512, "height": 512, "length": 33, "batch_size": 1}},
            "2": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
            "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
            "4": {"class_type": "CreateVideo", "inputs": {"images": ["3", 0], "fps": 16}},
            "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0],
                  "filename_prefix": "transcript/slow", "format": "auto", "codec": "auto"}}}


def failing_graph(latent_name: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
            "2": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["1", 0], "filename_prefix": "transcript/fail"}}}


class Recorder:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.client_id = uuid.uuid4().hex

    def run(self, prompt: dict[str, Any], during: Any = None) -> dict[str, Any]:
        """Queue a prompt and record every WebSocket message until it ends."""
        ws = connect(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}",
                     max_size=2**26)
        t0 = time.monotonic()
        msgs: list[Any] = []
        r = self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id})
        r.raise_for_status()
        pid = r.json()["prompt_id"]
        seen_during = None
        while True:
            raw = ws.recv(timeout=900)
            if isinstance(raw, bytes):
                msgs.append({"t": round(time.monotonic() - t0, 3), "binary": len(raw)})
                continue
            m = json.loads(raw)
            msgs.append({"t": round(time.monotonic() - t0, 3), **m})
            if during is not None and seen_during is None and m["type"] == "executing":
                seen_during = during()
            if m["type"] == "executing" and m["data"].get("node") is None \
                    and m["data"].get("prompt_id") == pid:
                break
        ws.close()
        history = self.http.get(f"/history/{pid}").json().get(pid)
        return {"prompt_id": pid, "prompt": prompt, "messages": msgs, "history": history,
                "during": seen_during}

    def validation(self, base: dict[str, Any], i2v: dict[str, Any]) -> dict[str, Any]:
        cases: dict[str, Any] = {}

        def case(name: str, wf: dict[str, Any], mutate: Any) -> None:
            w = copy.deepcopy(wf)
            mutate(w)
            r = self.http.post("/prompt", json={"prompt": w, "client_id": "record"})
            cases[name] = {"status": r.status_code, "body": r.json(), "prompt": w}

        case("missing_node_type", base, lambda w: w["88"].update(class_type="NoSuchNode"))
        case("value_not_in_list", base, lambda w: w["75"]["inputs"].update(
            unet_name="missing.safetensors"))
        case("value_smaller_than_min", base, lambda w: w["74"]["inputs"].update(length=0))
        case("value_bigger_than_max", base, lambda w: w["74"]["inputs"].update(length=99999))
        case("invalid_input_type", base, lambda w: w["74"]["inputs"].update(width="wide"))
        case("required_input_missing", base, lambda w: w["74"]["inputs"].pop("height"))
        case("prompt_no_outputs", base, lambda w: [w.pop(k) for k in ("80", "88")])
        case("return_type_mismatch", base, lambda w: w["87"]["inputs"].update(vae=["71", 0]))
        case("exception_during_inner_validation", base,
             lambda w: w["87"]["inputs"].update(vae=["999", 0]))
        case("custom_validation_failed", i2v, lambda w: w["97"]["inputs"].update(
            image="start.png"))
        r = self.http.post("/prompt", json={"client_id": "record"})
        cases["no_prompt"] = {"status": r.status_code, "body": r.json(), "prompt": None}
        return cases

    def free_semantics(self) -> dict[str, Any]:
        """/free only sets flags that ComfyUI acts on between prompts: unload_models keeps
        the cache, free_memory resets it."""
        g = cheap_graph(length=9)
        first = self.run(g)
        r = self.http.post("/free", json={"unload_models": True})
        after_unload = self.run(g)
        self.http.post("/free", json={"free_memory": True})
        after_free_memory = self.run(g)
        return {"free_status": r.status_code, "free_body": r.text,
                "free_content_type": r.headers.get("content-type"),
                "cached_nodes": {name: next(m["data"]["nodes"] for m in ex["messages"]
                                            if m.get("type") == "execution_cached")
                                 for name, ex in (("first", first),
                                                  ("after_unload_models", after_unload),
                                                  ("after_free_memory", after_free_memory))}}


def sanitize(stats: dict[str, Any]) -> dict[str, Any]:
    argv = []
    for a in stats["system"]["argv"]:
        argv.append("<path>" if "/" in a and not a.startswith("sqlite") else
                    ("sqlite:///<path>" if a.startswith("sqlite") else a))
    stats["system"]["argv"] = argv
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running test server (default: start one)")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(ROOT / "scripts"))
        import comfyui_test_server as tool

        server = tool.start(tool.prepare(), Path(tempfile.mkdtemp(prefix="record-")))
        url = server.url
    try:
        rec = Recorder(url)
        OUT.mkdir(parents=True, exist_ok=True)
        wf = json.loads((ROOT / "workflows" / "wan22_14b_t2v.json").read_text())
        i2v = json.loads((ROOT / "workflows" / "wan22_14b_i2v.json").read_text())
        stats = sanitize(rec.http.get("/system_stats").json())
        info = rec.http.get("/object_info").json()
        write("system_stats.json", stats)
        write("object_info.json", {k: info[k] for k in CLASSES if k in info})
        write("validation_errors.json", rec.validation(wf, i2v))
        g = cheap_graph(length=13, size=48)
        write("ws_fresh.json", rec.run(g))
        write("ws_cached.json", rec.run(g))
        bogus = Path(tempfile.mkdtemp()) / "stv_corrupt.latent"
        bogus.write_bytes(b"not a latent")
        with open(bogus, "rb") as fh:
            up = rec.http.post("/upload/image", files={"image": (bogus.name, fh)},
                               data={"type": "input", "overwrite": "true"}).json()
        write("upload_image.json", up)
        write("ws_failing.json", rec.run(failing_graph(up["name"])))
        write("ws_slow_with_queue.json", rec.run(
            slow_graph(), during=lambda: rec.http.get("/queue").json()))
        write("free_semantics.json", rec.free_semantics())
        write("ws_sampling.json", rec.run(sampling_graph(wf)))
    finally:
        if server is not None:
            server.stop()
    return 0


def sampling_graph(wf: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.real_comfyui import NEGATIVE, PROMPT

    g = copy.deepcopy(wf)
    g["89"]["inputs"]["text"], g["72"]["inputs"]["text"] = PROMPT, NEGATIVE
    g["74"]["inputs"].update(width=128, height=128, length=9)
    g["81"]["inputs"]["noise_seed"] = int(time.time()) % 100000  # fresh sampling, cached text
    g["80"]["inputs"]["filename_prefix"] = "transcript/sampling"
    return g


def write(name: str, data: Any) -> None:
    (OUT / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT / name}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
