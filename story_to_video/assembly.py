"""Join clips into final.mp4 with moviepy, frame-exact, written atomically."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moviepy import CompositeVideoClip, VideoClip, VideoFileClip, concatenate_videoclips, vfx
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .engines.video_io import H264, VideoInfo, probe
from .textsafe import srt as srt_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipRef:
    path: Path
    frames: int
    fps: int
    caption: str = ""


def _burn(text: str) -> Callable[[np.ndarray], np.ndarray]:
    """A frame transform drawing `text` in a band at the bottom."""
    def draw(frame: np.ndarray) -> np.ndarray:
        img = Image.fromarray(frame)
        h = img.height
        size = max(12, h // 24)
        font = ImageFont.load_default(size=size)
        lines = textwrap.wrap(" ".join(text.split()), max(20, int(img.width / (size * 0.55))))
        lines = lines[:2]
        band = len(lines) * (size + 4) + 10
        d = ImageDraw.Draw(img, "RGBA")
        d.rectangle((0, h - band, img.width, h), fill=(0, 0, 0, 160))
        for i, line in enumerate(lines):
            d.text((10, h - band + 5 + i * (size + 4)), line, font=font, fill=(255, 255, 255))
        return np.asarray(img)
    return draw


def _interpolated(clip: VideoClip, src_fps: int, out_fps: int) -> VideoClip:
    """Blend neighbouring frames to reach out_fps (a simple stand-in for RIFE when the
    engine did not interpolate)."""
    last = clip.duration - 1 / src_fps

    def frame(t: float) -> np.ndarray:
        pos = t * src_fps
        i = int(np.floor(pos))
        a = pos - i
        f0: np.ndarray = np.asarray(clip.get_frame(min(i / src_fps, last)), np.float32)
        if a < 1e-6:
            return f0.astype(np.uint8)
        f1: np.ndarray = np.asarray(clip.get_frame(min((i + 1) / src_fps, last)), np.float32)
        return ((1 - a) * f0 + a * f1).round().astype(np.uint8)

    return VideoClip(frame_function=frame, duration=clip.duration).with_fps(out_fps)


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


def assemble(clips: Sequence[ClipRef], out: Path, fps: int, crossfade_s: float = 0.0,
             burn_captions: bool = False, output_fps: int | None = None) -> VideoInfo:
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
        if burn_captions:
            parts = [p.image_transform(_burn(ref.caption)) if ref.caption else p
                     for ref, p in zip(clips, parts, strict=True)]
        if crossfade_s > 0 and len(parts) > 1:
            parts = [parts[0]] + [p.with_effects([vfx.CrossFadeIn(crossfade_s)])
                                  for p in parts[1:]]
            joined = concatenate_videoclips(parts, method="compose", padding=-crossfade_s)
        else:
            joined = concatenate_videoclips(parts, method="chain")
        if output_fps and output_fps > fps:
            joined = _interpolated(joined, fps, output_fps)
        with atomic_path(out) as tmp:
            joined.write_videofile(str(tmp), fps=output_fps or fps, threads=2, **H264)
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
    """SubRip text from (caption, frames, fps) in order: one cue per shot. Captions are LLM
    text: one line, no control characters, no tags a player would render."""
    out, t = [], 0.0
    for i, (text, frames, fps) in enumerate(captions, start=1):
        end = t + frames / fps
        out.append(f"{i}\n{_stamp(t)} --> {_stamp(end)}\n{srt_text(text)}\n")
        t = end
    return "\n".join(out)
