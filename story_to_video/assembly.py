"""Join clips into final.mp4 with moviepy, frame-exact, written atomically."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moviepy import VideoFileClip, concatenate_videoclips

from .atomic import atomic_path
from .engines.video_io import H264, VideoInfo, probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipRef:
    path: Path
    frames: int
    fps: int


def assemble(clips: Sequence[ClipRef], out: Path, fps: int) -> VideoInfo:
    """Concatenate in order. Each clip is held to exactly frames/fps seconds: moviepy rounds
    a file's duration to 10 ms and would otherwise drop up to one frame per clip."""
    if not clips:
        raise ValueError("no clips to assemble")
    opened = [VideoFileClip(str(c.path)) for c in clips]
    try:
        size = opened[0].size
        parts = []
        for ref, clip in zip(clips, opened, strict=True):
            if tuple(clip.size) != tuple(size):
                clip = clip.resized(new_size=size)
            parts.append(clip.with_duration(ref.frames / ref.fps))
        joined = concatenate_videoclips(parts, method="chain")
        with atomic_path(out) as tmp:
            joined.write_videofile(str(tmp), fps=fps, threads=2, **H264)
    finally:
        for c in opened:
            c.close()
    info = probe(out)
    log.info("assembled %d clips into %s: %d frames, %.2fs", len(clips), out, info.frames,
             info.seconds)
    return info


def _stamp(seconds: float) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    sec, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{sec:02d},{ms:03d}"


def srt(captions: Sequence[tuple[str, int, int]]) -> str:
    """SubRip text from (caption, frames, fps) in order: one cue per shot."""
    out, t = [], 0.0
    for i, (text, frames, fps) in enumerate(captions, start=1):
        end = t + frames / fps
        out.append(f"{i}\n{_stamp(t)} --> {_stamp(end)}\n{' '.join(text.split())}\n")
        t = end
    return "\n".join(out)
