from __future__ import annotations

import os
from pathlib import Path

import pytest

from story_to_video.run import InputError, RunFolder, RunSpec, inside, safe_name


def spec(tmp_path: Path, **kw: object) -> RunSpec:
    base: dict[str, object] = {"idea": "a fox", "scenes": 2, "target_seconds": 8,
                               "style": "noir", "engine": "preview", "output_dir": tmp_path}
    base.update(kw)
    return RunSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"idea": "   "}, "idea is empty"),
    ({"scenes": 0}, "scenes must be between 1 and 20, got 0"),
    ({"target_seconds": -1}, "target_seconds must be in"),
    ({"idea": "x" * 1001}, "keep it to one line"),
])
def test_bad_inputs(tmp_path: Path, kw: dict[str, object], msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        spec(tmp_path, **kw)


def test_unwritable_output_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(InputError, match="is not writable"):
            RunFolder(spec(ro)).prepare()
    finally:
        ro.chmod(0o700)


def test_output_folder_that_is_a_file_or_impossible(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is not writable"):
        RunFolder(spec(f)).prepare()
    with pytest.raises(InputError, match="/proc/stv/.* is not writable"):
        RunFolder(spec(Path("/proc/stv"))).prepare()  # refused even to root


@pytest.mark.parametrize(("text", "expected"), [
    ("../../etc/passwd", "etc-passwd"),
    ("/abs/path", "abs-path"),
    ("Caf\u00e9 \u6f22\u5b57 \U0001f40b!", "cafe"),
    ("..", "run"),
])
def test_safe_names_never_escape(text: str, expected: str) -> None:
    assert safe_name(text) == expected


def test_inside_refuses_escape(tmp_path: Path) -> None:
    assert inside(tmp_path, "a.mp4") == (tmp_path / "a.mp4").resolve()
    with pytest.raises(InputError, match="leaves"):
        inside(tmp_path, "../x.mp4")


def test_run_dir_is_stable_and_sweeps_partials(tmp_path: Path) -> None:
    a, b = spec(tmp_path), spec(tmp_path, idea="a   fox")
    assert a.dir == b.dir  # same idea, same run folder: a re-run resumes
    assert spec(tmp_path, scenes=3).dir != a.dir
    assert spec(tmp_path, target_seconds=8.0).dir == a.dir  # 8 and 8.0 are one run
    folder = RunFolder(a)
    folder.prepare()
    stale = folder.clips / ".s01-sh01-abc.partial-123.mp4"
    stale.write_bytes(b"half")
    assert folder.prepare() == [stale]
    assert not stale.exists()
