"""The Prefect UI as the morning control room, in a real browser.

A real `prefect server start`, `story-to-video serve` for the videos, one `story-to-video run`
with the embedded LLM and the preview engine (a long idea), and one with the ComfyUI engine
against the fake ComfyUI (for the VRAM table, plot and broker logs). Headless Chromium from
the system, driven over the DevTools protocol (tests/cdp.py), opens the parent run, the
video run, the summary, the report and the VRAM table, and checks what a person would see.
Screenshots go to a temporary folder (STV_SCREENSHOTS names one to keep them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from story_to_video.llm.embedded import free_port
from story_to_video.ui import key_words, run_title
from tests.cdp import Page, Request, chromium, chromium_binary
from tests.fake_comfyui import FakeComfyUI
from tests.prefect_server import prefect_server
from tests.test_flow_comfyui import seed_plan

CHROMIUM = chromium_binary()
pytestmark = [
    pytest.mark.slow, pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install "
                       "chromium; .ci/run installs it)"),
]
STV = str(Path(sys.executable).parent / "story-to-video")
LONG_IDEA = ("a paper boat sails through a flooded city at dawn while the bells of every "
             "drowned church ring out and a girl on a rooftop follows it with a lantern")
GPU_IDEA = "a whale sings"
# Requests the Prefect UI makes for its own assets and that its server answers 404: not
# content of this project (a favicon at the root, a flow-run state icon).
UI_OWN_404 = ("/favicon.ico", "/ico/undefined.svg")


@dataclass
class Night:
    api: str
    ui: str
    media: str
    out: Path
    shots: Path

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def runs(self, idea: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(parent run, video run) of the newest run of `idea`."""
        runs = self.post("/flow_runs/filter", {"sort": "START_TIME_DESC"})
        parent = next(r for r in runs if r["parameters"].get("idea") == idea
                      and r["parent_task_run_id"] is None)
        video = next(r for r in runs if r["parameters"].get("idea") == idea
                     and r["parent_task_run_id"] is not None)
        return parent, video

    def manifest(self, idea: str) -> dict[str, Any]:
        for path in self.out.glob("*/manifest.json"):
            data: dict[str, Any] = json.loads(path.read_text())
            if data["idea"] == idea:
                return data
        raise LookupError(idea)

    def artifacts(self, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A run's artifacts by kind: summary, report, vram, progress."""
        found = self.post("/artifacts/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        return {a["key"].split("-", 1)[0]: a for a in found if a["key"]}


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    res = subprocess.run([STV, *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Night]:
    tmp = tmp_path_factory.mktemp("night")
    out = tmp / "runs"
    out.mkdir()
    shots = Path(os.environ.get("STV_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    media_port = free_port()
    with prefect_server(tmp) as env:
        env = {k: v for k, v in env.items() if not k.startswith("STV_")}
        env.update(STV_UI__MEDIA_URL=f"http://127.0.0.1:{media_port}",
                   STV_LLM__MAX_REPAIR_TRIES="5", PYTHONUNBUFFERED="1")
        serve_log = open(tmp / "serve.log", "wb")  # noqa: SIM115
        media = subprocess.Popen([STV, "serve", "--dir", str(out), "--port", str(media_port)],
                                 env=env, cwd=tmp, stdout=serve_log, stderr=subprocess.STDOUT)
        fake = FakeComfyUI().start()
        fake.faults.step_delay_s = 0.0
        try:
            _cli(env, tmp, "run", "--idea", LONG_IDEA, "--scenes", "1", "--target-seconds",
                 "4", "--output", str(out))
            seed_plan(out, GPU_IDEA)  # planned already: no LLM needed for this one
            _cli({**env, "STV_COMFYUI__URL": fake.url, "STV_COMFYUI__WORKFLOW": "wan22_14b_t2v"},
                 tmp, "run", "--idea", GPU_IDEA, "--scenes", "2", "--target-seconds", "10",
                 "--engine", "comfyui", "--output", str(out))
            api = env["PREFECT_API_URL"]
            yield Night(api, api.removesuffix("/api"), env["STV_UI__MEDIA_URL"], out, shots)
        finally:
            fake.stop()
            media.terminate()
            media.wait(timeout=30)
            serve_log.close()
            print(f"screenshots in {shots}")


@pytest.fixture(scope="module")
def browser(night: Night) -> Iterator[Callable[[], Page]]:
    assert CHROMIUM is not None
    profile = night.shots.parent / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir()
    with chromium(CHROMIUM, profile) as open_page:
        yield open_page


def _open(page: Page, url: str, ready: str, what: str) -> None:
    """Load a UI page and wait until `ready` (JS) holds: the UI renders after its API calls."""
    page.goto(url)
    page.wait_for(ready, what=what)
    page.pump(1.0)  # images and late requests


def _failed_requests(page: Page) -> list[tuple[str, int | None, str]]:
    return [(r.url, r.status, r.error) for r in page.requests.values()
            if r.failed and not r.url.endswith(UI_OWN_404) and not _media_range_dropped(r)]


def _media_range_dropped(r: Request) -> bool:
    """A video's range request that the player dropped once it had what it needed: the
    server answered 206 Partial Content, Chromium cancelled the rest. Not a failure."""
    return r.status == 206 and r.error == "net::ERR_ABORTED"


def _tables_overflowing(page: Page) -> list[str]:
    """Tables wider than what shows them (the UI never wraps a cell): their headers."""
    return list(page.evaluate("""[...document.querySelectorAll('table')].filter(t => {
        let box = t.parentElement;
        while (box && box !== document.body) {
            if (box.scrollWidth > box.clientWidth + 1) return true;
            box = box.parentElement;
        }
        return false;
    }).map(t => t.querySelector('tr').innerText)"""))


def _text_has(s: str) -> str:
    return f"document.body.innerText.includes({s!r})"


def _plays(page: Page, url: str) -> dict[str, Any]:
    """Open a video link in the browser and read what its <video> element loaded."""
    page.goto(url)
    info: dict[str, Any] = page.wait_for(
        "(() => { const v = document.querySelector('video');"
        " return v && v.readyState >= 1 ? {duration: v.duration, width: v.videoWidth,"
        " error: v.error && v.error.code} : null; })()", what=f"video at {url}")
    return info


def test_parent_run_tells_the_story(night: Night, browser: Callable[[], Page]) -> None:
    parent, video = night.runs(LONG_IDEA)
    title = run_title(LONG_IDEA)
    assert parent["name"] == video["name"] == title
    assert len(title) <= 63 and title.endswith("...")
    assert LONG_IDEA.startswith(title[:-3] + " ")  # cut between words
    arts = night.artifacts(parent)
    assert arts["summary"]["key"] == f"summary-{key_words(LONG_IDEA)}"
    assert (LONG_IDEA.replace(" ", "-") + "-").startswith(key_words(LONG_IDEA) + "-")

    page = browser()
    _open(page, f"{night.ui}/runs/flow-run/{parent['id']}",
          _text_has("made "), "the parent run's log lines")
    text = page.text()
    assert title in text and "final.mp4" in text and "summary: " in text
    page.click_text("Artifacts")
    page.wait_for(_text_has(arts["summary"]["key"]), what="the summary in the Artifacts tab")
    page.screenshot(night.shots / "parent-run.png")
    assert not _failed_requests(page)

    _open(page, f"{night.ui}/artifacts/artifact/{arts['summary']['id']}",
          _text_has("1 made, 0 failed"), "the summary artifact")
    links = page.evaluate("[...document.querySelectorAll('a')].map(a => [a.innerText, a.href])")
    by_text = {t: h for t, h in links}
    assert by_text["run"] == f"{night.ui}/runs/flow-run/{video['id']}"
    assert by_text["report"] == (f"{night.ui}/artifacts/artifact/"
                                 f"{night.artifacts(video)['report']['id']}")
    assert by_text["final.mp4"].startswith(night.media + "/")
    page.screenshot(night.shots / "summary.png")
    assert not _failed_requests(page)
    assert not _tables_overflowing(page)
    seconds = night.manifest(LONG_IDEA)["final"]["seconds"]
    assert _plays(page, by_text["final.mp4"])["duration"] == pytest.approx(seconds, abs=0.1)


@pytest.mark.parametrize(("idea", "images"), [
    (LONG_IDEA, ["contact sheet"]),
    (GPU_IDEA, ["contact sheet", "VRAM timeline"]),
])
def test_report_shows_images_and_its_videos_play(night: Night, browser: Callable[[], Page],
                                                 idea: str, images: list[str]) -> None:
    _parent, video = night.runs(idea)
    report = night.artifacts(video)["report"]
    page = browser()
    _open(page, f"{night.ui}/artifacts/artifact/{report['id']}",
          f"[...document.images].filter(i => i.alt).length >= {len(images)} && "
          "[...document.images].every(i => i.complete)", "the report's images")
    loaded = page.evaluate("[...document.images].filter(i => i.alt)"
                           ".map(i => [i.alt, i.naturalWidth, i.src.slice(0, 22)])")
    assert [a for a, _w, _s in loaded] == images
    assert all(w > 0 and src.startswith("data:image/") for _a, w, src in loaded), loaded
    page.screenshot(night.shots / f"report-{key_words(idea, 20)}.png")
    assert not _failed_requests(page)
    assert not _tables_overflowing(page)

    media = page.evaluate(f"[...document.links].map(a => a.href)"
                          f".filter(h => h.startsWith({night.media + '/'!r}))")
    videos = [m for m in media if m.endswith(".mp4")]
    assert len(videos) == 1 + len(night.manifest(idea)["shots"])  # final.mp4, each clip
    for url in videos:
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("video/"), url
        played = _plays(page, url)
        assert played["duration"] > 1 and played["width"] == 832 and not played["error"]
        assert not _failed_requests(page), url


def test_vram_table_fits_and_broker_lines_sit_in_their_tasks(
        night: Night, browser: Callable[[], Page]) -> None:
    _parent, video = night.runs(GPU_IDEA)
    vram = night.artifacts(video)["vram"]
    assert "vram" not in night.artifacts(night.runs(LONG_IDEA)[1])  # preview: no GPU work
    page = browser()
    _open(page, f"{night.ui}/artifacts/artifact/{vram['id']}",
          "document.querySelectorAll('td').length > 0", "the VRAM table")
    table = page.evaluate("""(() => {
        const t = document.querySelector('table');
        return {headers: [...t.querySelectorAll('th')].map(h => h.innerText.trim()),
                cells: [...t.querySelectorAll('td')].map(c => c.innerText.trim()),
                bullets: t.querySelectorAll('li').length};
    })()""")
    page.screenshot(night.shots / "vram-table.png")
    assert table["headers"] == ["shot", "predicted peak GiB", "measured peak GiB",
                                "min free GiB", "broker actions", "render s"]
    assert not _tables_overflowing(page)
    assert table["bullets"] == 0
    assert not any(c in ("{}", "-", "None", "null", "NaN") for c in table["cells"]), table
    assert "one-prompt\ntext-encoder-default\ndecode-full" in table["cells"]
    assert not _failed_requests(page)

    tasks = night.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [video["id"]]}}})
    render = next(t for t in tasks if t["name"] == "render-s01_sh01")
    _open(page, f"{night.ui}/runs/task-run/{render['id']}",
          _text_has("broker experts [s01_sh01]"), "broker lines in the render task's log")
    text = page.text()
    page.screenshot(night.shots / "render-task.png")
    assert "NaN" not in text
    assert re.search(r"Retry Delay\s+20s", text)
    assert "broker decode [s01_sh01]" in text and "GiB" in text
    assert not _failed_requests(page)


def test_moved_run_folder_says_so(night: Night, browser: Callable[[], Page]) -> None:
    final = next(night.out.glob(f"{key_words(GPU_IDEA)}-*/final.mp4"))
    moved = final.parent.with_name("elsewhere")
    final.parent.rename(moved)
    try:
        page = browser()
        page.goto(f"{night.media}/{final.parent.name}/final.mp4")
        page.wait_for(_text_has("moved or deleted"), what="the media server's explanation")
        statuses = [r.status for r in page.requests.values() if r.url.endswith("final.mp4")]
        assert statuses == [404]
        page.screenshot(night.shots / "moved-folder.png")
    finally:
        moved.rename(final.parent)
    deadline = time.monotonic() + 5
    while httpx.get(f"{night.media}/{final.parent.name}/final.mp4").status_code != 200:
        assert time.monotonic() < deadline
