"""The `preview` engine: an animatic clip per shot, at the shot's real frames, fps and size.

No model weights are needed. Each clip shows the scene title, the shot's action and camera
move over a generated background that moves as the camera would, and is labelled PREVIEW on
every frame, so nobody mistakes it for a generation.
"""

from __future__ import annotations

import colorsys
import hashlib
import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path
from ..models import Shot
from .base import ClipResult, EngineStatus, Progress, ProgressCallback
from .video_io import write_frames

log = logging.getLogger(__name__)
PREVIEW_VERSION = "preview-1"
OPENING = 0.25  # share of a clip that dissolves from its start image into the animatic
_MARGIN = 1.35  # background is this much larger than the frame, room for the camera to move


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _background(shot: Shot) -> Image.Image:
    w, h = int(shot.width * _MARGIN), int(shot.height * _MARGIN)
    rnd = np.random.default_rng(shot.scene_index * 7919 + 17)
    hue = (shot.scene_index * 0.17 + 0.55) % 1.0
    top = np.array(colorsys.hsv_to_rgb(hue, 0.55, 0.35)) * 255
    bottom = np.array(colorsys.hsv_to_rgb((hue + 0.08) % 1, 0.45, 0.85)) * 255
    t = np.linspace(0, 1, h)[:, None, None]
    img = (top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    for _ in range(14):  # landmarks, so pans and zooms are visible
        cx, cy = rnd.uniform(0, w), rnd.uniform(h * 0.3, h)
        r = rnd.uniform(h * 0.04, h * 0.16)
        shade = tuple(int(c) for c in rnd.integers(40, 220, size=3))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shade)
    for x in range(0, w, max(16, w // 24)):  # a grid, for the same reason
        draw.line((x, 0, x, h), fill=(255, 255, 255), width=1)
    return canvas


def _camera_box(shot: Shot, t: float) -> tuple[float, float, float, float]:
    """Crop box in background pixels for time t in [0, 1]."""
    bw, bh = float(int(shot.width * _MARGIN)), float(int(shot.height * _MARGIN))
    fw, fh = float(shot.width), float(shot.height)
    dx, dy = bw - fw, bh - fh
    x, y, scale = dx / 2, dy / 2, 1.0
    move = shot.camera
    if move == "pan-left":
        x = dx * (1 - t)
    elif move in ("pan-right", "tracking"):
        x = dx * t
    elif move == "tilt-up":
        y = dy * (1 - t)
    elif move == "tilt-down":
        y = dy * t
    elif move in ("zoom-in", "dolly-in"):
        scale = 1 - 0.25 * t
    elif move in ("zoom-out", "dolly-out"):
        scale = 0.75 + 0.25 * t
    elif move == "orbit":
        x, y = dx / 2 * (1 + np.sin(2 * np.pi * t)), dy / 2 * (1 + np.cos(2 * np.pi * t)) * 0.5
    elif move == "handheld":
        x, y = dx / 2 + 6 * np.sin(31 * t), dy / 2 + 5 * np.cos(23 * t)
    cw, ch = fw * scale, fh * scale
    left = min(max(0.0, x + (fw - cw) / 2), bw - cw)
    top = min(max(0.0, y + (fh - ch) / 2), bh - ch)
    return (left, top, left + cw, top + ch)


def _overlay(shot: Shot, scene_title: str) -> Image.Image:
    """Text layer drawn once per shot."""
    layer = Image.new("RGBA", (shot.width, shot.height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    big, small = max(14, shot.height // 18), max(10, shot.height // 30)
    draw.rectangle((0, 0, shot.width, big + small + 24), fill=(0, 0, 0, 150))
    draw.text((12, 8), f"PREVIEW  {shot.id}  {scene_title}", font=_font(big),
              fill=(255, 210, 80, 255))
    draw.text((12, big + 14), f"camera: {shot.camera}   {shot.frames} f @ {shot.fps} fps  "
              f"seed {shot.seed}", font=_font(small), fill=(230, 230, 230, 255))
    chars = max(20, int(shot.width / (small * 0.6)))
    lines = textwrap.wrap(shot.action, chars)[:4]
    box_h = len(lines) * (small + 6) + 28
    draw.rectangle((0, shot.height - box_h, shot.width, shot.height), fill=(0, 0, 0, 160))
    for i, line in enumerate(lines):
        draw.text((12, shot.height - box_h + 8 + i * (small + 6)), line, font=_font(small),
                  fill=(255, 255, 255, 255))
    return layer


def _start_image(shot: Shot) -> Image.Image | None:
    if not shot.start_image:
        return None
    with Image.open(shot.start_image) as img:
        out: Image.Image = img.convert("RGB").resize((shot.width, shot.height))
        return out


def render_preview_frames(shot: Shot, scene_title: str) -> list[np.ndarray]:
    """The animatic; with a start image the clip opens on it exactly (frame 0 is the
    image) and dissolves into the animatic, so continuity can be checked by eye."""
    bg = _background(shot)
    overlay = _overlay(shot, scene_title)
    start = _start_image(shot)
    opening = max(1, round(shot.frames * OPENING))
    frames = []
    for i in range(shot.frames):
        t = i / max(1, shot.frames - 1)
        box = _camera_box(shot, t)
        frame = bg.resize((shot.width, shot.height), Image.Resampling.BILINEAR, box=box)
        if start is not None and i == 0:
            frames.append(np.asarray(start))
            continue
        if start is not None and i < opening:
            frame = Image.blend(start, frame.convert("RGB"), i / opening)
        frame = Image.alpha_composite(frame.convert("RGBA"), overlay)
        bar = ImageDraw.Draw(frame)  # time bar: shows pacing within the shot
        bar.rectangle((0, shot.height - 6, int(shot.width * (i + 1) / shot.frames),
                       shot.height), fill=(255, 210, 80, 255))
        frames.append(np.asarray(frame.convert("RGB")))
    return frames


class PreviewEngine:
    name = "preview"
    is_preview = True

    def __init__(self, scene_titles: dict[int, str] | None = None) -> None:
        self.scene_titles = scene_titles or {}

    def fingerprint(self) -> str:
        src = Path(__file__).read_bytes()
        return f"{PREVIEW_VERSION}-{hashlib.sha256(src).hexdigest()[:10]}"

    def check(self) -> EngineStatus:
        return EngineStatus(True, "preview engine (animatic clips, no GPU, no model weights)")

    takes_start_image = True

    def check_shots(self, shots: list[Shot]) -> None:
        return None  # any shot can be drawn

    def keyframe_fingerprint(self) -> str:
        return self.fingerprint()

    def render_keyframe(self, shot: Shot, prompt: str, out_path: Path) -> dict[str, Any]:
        """A stand-in keyframe: the shot's animatic background with its id and prompt,
        labelled PREVIEW KEYFRAME."""
        start = time.monotonic()
        img = _background(shot).resize((shot.width, shot.height))
        draw = ImageDraw.Draw(img)
        size = max(10, shot.height // 24)
        draw.rectangle((0, 0, shot.width, size * 2 + 12), fill=(0, 0, 0))
        draw.text((8, 4), f"PREVIEW KEYFRAME {shot.id}", font=_font(size),
                  fill=(120, 220, 255))
        chars = max(20, int(shot.width / (size * 0.6)))
        draw.text((8, size + 8), textwrap.shorten(prompt, chars), font=_font(size),
                  fill=(255, 255, 255))
        with atomic_path(out_path) as tmp:
            img.save(tmp, format="PNG")
        return {"seconds": round(time.monotonic() - start, 3), "preview": True}

    def after_keyframes(self, unload: bool) -> None:
        return None

    def render(
        self, shot: Shot, out_path: Path, progress: ProgressCallback | None = None
    ) -> ClipResult:
        start = time.monotonic()
        title = self.scene_titles.get(shot.scene_index, f"Scene {shot.scene_index + 1}")
        log.info("PREVIEW render of %s: %d frames at %d fps, %dx%d (animatic, not a generation)",
                 shot.id, shot.frames, shot.fps, shot.width, shot.height)
        frames = render_preview_frames(shot, title)
        if progress:
            progress(Progress(shot.id, 1, 2, "render"))
        with atomic_path(out_path) as tmp:
            write_frames(frames, shot.fps, tmp)
        if progress:
            progress(Progress(shot.id, 2, 2, "encode"))
        return ClipResult(
            path=out_path, frames=shot.frames, fps=shot.fps, width=shot.width,
            height=shot.height, seconds=time.monotonic() - start, engine=self.name,
            preview=True,
        )

    def after_shot(self, shot: Shot) -> None:
        return None

    def close(self) -> None:
        return None
