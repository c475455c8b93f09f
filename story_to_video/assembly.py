"""Join clips into final.mp4 with moviepy, frame-exact, written atomically."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moviepy import CompositeVideoClip, VideoClip, VideoFileClip, concatenate_videoclips, vfx

from .atomic import atomic_path
from .engines.video_io import H264, VideoInfo, probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipRef:
    path: Path
    frames: int
    fps: int


def _fit(clip: VideoClip, size: tuple[int, int]) -> VideoClip:
    """Scale to fit `size` keeping the aspect ratio; pad the rest black (letterbox)."""
    w, h = size
    cw, ch = clip.size
    if (cw, ch) == (w, h):
        return clip
    scale = min(w / cw, h / ch)
    scaled = clip.resized(new_size=(max(2, round(cw * scale)), max(2, round(ch * scale))))
    if tuple(scaled.size) == (w, h):
        return scaled
    return CompositeVideoClip([scaled.with_position("center")], size=(w, h),
                              bg_color=(0, 0, 0)).with_duration(clip.duration)


def assemble(clips: Sequence[ClipRef], out: Path, fps: int,
             crossfade_s: float = 0.0) -> VideoInfo:
    """Concatenate in order at one size and fps (others are scaled and padded, resampled).
    Each clip is held to exactly frames/fps seconds: moviepy rounds a file's duration to
    10 ms and would otherwise drop up to one frame per clip. With crossfade_s, neighbours
    overlap by that much."""
    if not clips:
        raise ValueError("no clips to assemble")
    opened = [VideoFileClip(str(c.path)) for c in clips]
    try:
        size = (int(opened[0].size[0]), int(opened[0].size[1]))
        parts = [_fit(clip.with_duration(ref.frames / ref.fps), size)
                 for ref, clip in zip(clips, opened, strict=True)]
        if crossfade_s > 0 and len(parts) > 1:
            parts = [parts[0]] + [p.with_effects([vfx.CrossFadeIn(crossfade_s)])
                                  for p in parts[1:]]
            joined = concatenate_videoclips(parts, method="compose", padding=-crossfade_s)
        else:
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
