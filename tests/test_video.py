"""Preview clips and assembly, checked with a real decoder (ffmpeg via imageio-ffmpeg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from story_to_video.assembly import ClipRef, assemble
from story_to_video.engines.preview import PreviewEngine
from story_to_video.engines.video_io import probe, read_frame, stream_codec
from story_to_video.models import Shot


def shot(i: int = 0, **kw: Any) -> Shot:
    base: dict[str, Any] = {"id": f"s01_sh{i + 1:02d}", "scene_index": 0, "shot_index": i,
                            "action": "A keeper waves at a whale", "prompt": "p",
                            "frames": 33, "fps": 16, "width": 320, "height": 192, "seed": 3,
                            "camera": "pan-right"}
    base.update(kw)
    return Shot(**base)


def test_preview_clip_has_the_shots_real_numbers(tmp_path: Path) -> None:
    s = shot(frames=49, fps=24, width=416, height=240)
    result = PreviewEngine({0: "Harbour"}).render(s, tmp_path / "c.mp4")
    info = probe(result.path)
    assert (info.frames, info.fps, info.width, info.height) == (49, 24.0, 416, 240)
    assert stream_codec(result.path) == "h264"
    assert result.preview and not result.cached and result.engine == "preview"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]  # no partial left


def test_camera_move_is_visible(tmp_path: Path) -> None:
    path = PreviewEngine().render(shot(camera="zoom-in"), tmp_path / "z.mp4").path
    first, last = read_frame(path, 0), read_frame(path, 32)
    # The landmarks moved: mid-frame pixels differ markedly between first and last frame.
    mid = slice(60, 130)
    assert np.abs(first[mid].astype(int) - last[mid]).mean() > 5
    static = PreviewEngine().render(shot(camera="static"), tmp_path / "s.mp4").path
    a, b = read_frame(static, 0), read_frame(static, 32)
    assert np.abs(a[mid].astype(int) - b[mid]).mean() < 3


def test_failed_encode_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import story_to_video.engines.preview as preview

    def broken(frames: object, fps: int, path: Path) -> None:
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(preview, "write_frames", broken)
    with pytest.raises(OSError, match="disk full"):
        PreviewEngine().render(shot(), tmp_path / "c.mp4")
    assert list(tmp_path.iterdir()) == []


def test_assembly_is_frame_exact_in_plan_order(tmp_path: Path) -> None:
    frames = [33, 37, 41]
    refs = []
    for i, f in enumerate(frames):
        r = PreviewEngine().render(shot(i, frames=f, scene_index=i), tmp_path / f"{i}.mp4")
        refs.append(ClipRef(r.path, f, 16))
    info = assemble(refs, tmp_path / "final.mp4", fps=16)
    assert info.frames == sum(frames)  # moviepy alone would drop a frame per clip
    assert info.seconds == pytest.approx(sum(frames) / 16, abs=1 / 16)
    # Boundaries: the first frame of clip 2 follows the last frame of clip 1.
    final = tmp_path / "final.mp4"
    for idx, (clip, at) in enumerate([(0, 32), (1, 0), (2, 0)]):
        pos = [32, 33, 70][idx]
        diff = np.abs(read_frame(final, pos).astype(int) - read_frame(refs[clip].path, at))
        assert diff.mean() < 4, (idx, diff.mean())


def test_assembly_scales_a_clip_of_another_size(tmp_path: Path) -> None:
    a = PreviewEngine().render(shot(0), tmp_path / "a.mp4")
    b = PreviewEngine().render(shot(1, width=640, height=384), tmp_path / "b.mp4")
    info = assemble([ClipRef(a.path, 33, 16), ClipRef(b.path, 33, 16)], tmp_path / "f.mp4",
                    fps=16)
    assert (info.width, info.height, info.frames) == (320, 192, 66)


def test_assembly_letterboxes_other_aspect_and_resamples_fps(tmp_path: Path) -> None:
    a = PreviewEngine().render(shot(0), tmp_path / "a.mp4")
    tall = PreviewEngine().render(shot(1, width=192, height=320, fps=8, frames=17),
                                  tmp_path / "t.mp4")
    info = assemble([ClipRef(a.path, 33, 16), ClipRef(tall.path, 17, 8)],
                    tmp_path / "f.mp4", fps=16)
    assert (info.width, info.height, info.fps) == (320, 192, 16.0)
    assert info.frames == 33 + 34  # 17 frames at 8 fps last 2.125 s: 34 frames at 16 fps
    edge = read_frame(tmp_path / "f.mp4", 50)[:, :40]  # left band of the padded clip
    assert edge.mean() < 20  # black letterbox


def test_crossfade_overlaps_neighbours(tmp_path: Path) -> None:
    refs = [ClipRef(PreviewEngine().render(shot(i, frames=33), tmp_path / f"{i}.mp4").path,
                    33, 16) for i in range(3)]
    info = assemble(refs, tmp_path / "x.mp4", fps=16, crossfade_s=0.5)
    assert info.frames == 99 - 2 * 8  # two overlaps of 8 frames


def test_captions_burnt_in_and_interpolated_fps(tmp_path: Path) -> None:
    a = PreviewEngine().render(shot(0, camera="static"), tmp_path / "a.mp4")
    plain = assemble([ClipRef(a.path, 33, 16)], tmp_path / "p.mp4", fps=16)
    cap = assemble([ClipRef(a.path, 33, 16, "THE WHALE SINGS AT DAWN")], tmp_path / "c.mp4",
                   fps=16, burn_captions=True)
    assert plain.frames == cap.frames == 33
    band = slice(150, 192)  # bottom band: captions there, untouched above
    diff = np.abs(read_frame(tmp_path / "c.mp4", 10).astype(int)
                  - read_frame(tmp_path / "p.mp4", 10))
    assert diff[band].mean() > 3 and diff[:100].mean() < 2
    up = assemble([ClipRef(a.path, 33, 16)], tmp_path / "u.mp4", fps=16, output_fps=32)
    assert up.fps == 32.0 and up.frames == 66
