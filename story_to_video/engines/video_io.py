"""Video files in and out: moviepy to write and join, ffmpeg (via imageio-ffmpeg) to probe."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from moviepy import ImageSequenceClip

H264 = {"codec": "libx264", "audio": False, "preset": "veryfast", "logger": None,
        "ffmpeg_params": ["-pix_fmt", "yuv420p", "-crf", "23"]}


def write_frames(frames: Sequence[np.ndarray], fps: int, path: Path) -> None:
    """Encode RGB frames as H.264; exactly len(frames) frames at `fps`."""
    clip = ImageSequenceClip(list(frames), fps=fps)
    try:
        clip.write_videofile(str(path), fps=fps, threads=2, **H264)
    finally:
        clip.close()


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    seconds: float
    fps: float
    width: int
    height: int
    codec: str


def probe(path: Path) -> VideoInfo:
    """Decode the whole file with ffmpeg: counts real frames, not container metadata."""
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    width, height = meta["size"]
    return VideoInfo(frames=frames, seconds=seconds, fps=float(meta["fps"]), width=width,
                     height=height, codec=str(meta.get("codec", "")))


def read_frame(path: Path, index: int) -> np.ndarray:
    """One decoded RGB frame (for contact sheets and tests)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    try:
        for i, raw in enumerate(reader):
            if i == index:
                return np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3).copy()
    finally:
        reader.close()
    raise IndexError(f"{path} has no frame {index}")


def ffmpeg_exe() -> str:
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def stream_codec(path: Path) -> str:
    """Codec name of the first video stream, from ffmpeg's own report."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True, check=False).stderr
    for line in out.splitlines():
        if "Video:" in line:
            return line.split("Video:")[1].split()[0].strip(",")
    return ""
