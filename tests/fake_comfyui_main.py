"""Run the fake ComfyUI as its own process: `python -m tests.fake_comfyui_main --port N`.

Used to test the supervised-process code path (start, health check, log, stop, restart).
FAKE_STALL_ONCE=<file>: if that file exists, stall at VAEDecode and delete it (so a restarted
server behaves); FAKE_DIE_ON_LATENT_UPLOAD_ONCE=<file>: the same, dying during a latent
upload; FAKE_ARGV: command-line flags the fake reports in /system_stats."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from tests.fake_comfyui import FakeComfyUI, Faults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    faults = Faults(step_delay_s=0.0)
    once = os.environ.get("FAKE_STALL_ONCE")
    if once and Path(once).exists():
        Path(once).unlink()
        faults.stall_at = "VAEDecode"
    die = os.environ.get("FAKE_DIE_ON_LATENT_UPLOAD_ONCE")
    if die and Path(die).exists():
        Path(die).unlink()
        faults.die_on_latent_upload = True
    argv = os.environ.get("FAKE_ARGV", "").split()
    server = FakeComfyUI(port=args.port, faults=faults,
                         argv=["main.py", *argv]).start()
    print(f"fake ComfyUI listening on {server.url}", flush=True)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        time.sleep(0.1)
    server.stop()
    print("fake ComfyUI stopped", flush=True)


if __name__ == "__main__":
    main()
