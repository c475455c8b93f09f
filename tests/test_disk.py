from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from story_to_video.models import Shot
from story_to_video.run import RunFolder, RunSpec
from tasks.render import DiskFull, check_disk


def test_full_disk_stops_before_the_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    folder = RunFolder(RunSpec(idea="a fox", scenes=1, target_seconds=4, style="noir",
                               engine="preview", output_dir=tmp_path))
    folder.prepare()
    shot = Shot(id="s01_sh01", scene_index=0, shot_index=0, action="a", prompt="p",
                frames=81, fps=16, width=832, height=480, seed=1)
    check_disk(folder, shot)  # plenty of room here

    def full(_: Any) -> Any:
        return shutil._ntuple_diskusage(100 * 2**30, 100 * 2**30 - 50 * 2**20, 50 * 2**20)  # type: ignore[attr-defined]

    monkeypatch.setattr(shutil, "disk_usage", full)
    with pytest.raises(DiskFull, match=r"only 50 MiB free .* shot s01_sh01 needs about 2\d\d "
                                       r"MiB\. Finished shots are kept"):
        check_disk(folder, shot)
