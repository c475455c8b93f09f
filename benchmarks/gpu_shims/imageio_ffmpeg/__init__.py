"""Stand-in for imageio-ffmpeg on the GPU benchmark machine only.

That machine has no network and carries wheels within 64 MiB; imageio-ffmpeg's wheel (an
ffmpeg binary, 68 MB) does not fit beside ComfyUI's own PyAV. The engine only probes and
reads clips there, which PyAV does from the same FFmpeg libraries. Never on a user's path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import av


def get_ffmpeg_exe() -> str:
    return "ffmpeg"  # moviepy asks at import; the benchmark never encodes through it


def count_frames_and_secs(path: str) -> tuple[int, float]:
    with av.open(path) as c:
        stream = c.streams.video[0]
        frames = sum(1 for _ in c.decode(stream))
        rate = float(stream.average_rate or stream.guessed_rate or 0)
    return frames, frames / rate if rate else 0.0


def read_frames(path: str, **_: Any) -> Iterator[Any]:
    c = av.open(path)
    stream = c.streams.video[0]
    try:
        yield {"size": (stream.width, stream.height),
               "fps": float(stream.average_rate or stream.guessed_rate or 0),
               "codec": stream.codec_context.name}
        for frame in c.decode(stream):
            yield frame.to_ndarray(format="rgb24").tobytes()
    finally:
        c.close()
