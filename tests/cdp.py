"""A minimal Chrome DevTools Protocol client for the browser test: headless Chromium from the
system (no browser download), one WebSocket per page, events kept for inspection.

Protocol reference: https://chromedevtools.github.io/devtools-protocol/ (Target, Page,
Network, Runtime domains; the /json/new and /json/version HTTP endpoints).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

# Without the background-networking flags Chromium dials out (updates, sync, field trials)
# and, on a closed network, gets its own connections refused many at a time.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
         "--window-size=1400,1000"]
WIDTH, HEIGHT = 1400, 1000


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Request:
    url: str
    status: int | None = None
    mime: str = ""
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error) or (self.status is not None and self.status >= 400)


@dataclass
class Page:
    ws: ClientConnection
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    requests: dict[str, Request] = field(default_factory=dict)
    loaded: bool = False

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is not None and msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def _recv(self, deadline: float) -> dict[str, Any] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from Chromium")
        try:
            msg: dict[str, Any] = json.loads(self.ws.recv(timeout=min(left, 0.2)))
        except TimeoutError:
            return None
        self._event(msg)
        return msg

    def _event(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests[p["requestId"]] = Request(p["request"]["url"])
        elif method == "Network.responseReceived" and p["requestId"] in self.requests:
            req = self.requests[p["requestId"]]
            req.status, req.mime = p["response"]["status"], p["response"]["mimeType"]
        elif method == "Network.loadingFailed" and p["requestId"] in self.requests:
            self.requests[p["requestId"]].error = p["errorText"]
        elif method == "Page.loadEventFired":
            self.loaded = True

    def pump(self, seconds: float) -> None:
        """Read events for a while (requests the page makes on its own)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._recv(deadline)
            except TimeoutError:
                return

    def goto(self, url: str, timeout: float = 60) -> None:
        self.requests.clear()
        self.loaded = False
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.loaded:
            self._recv(deadline)

    def evaluate(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60,
                 what: str = "") -> Any:
        """Poll a JS expression until it is truthy (the UI renders after its API calls)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what or expression}")
            self.pump(0.3)

    def text(self) -> str:
        return str(self.evaluate("document.body.innerText"))

    def click_text(self, text: str) -> None:
        """Click the innermost element whose own text is exactly `text` (a tab, a link)."""
        found = self.evaluate(f"""(() => {{
            const all = [...document.querySelectorAll('body *')]
                .filter(e => e.textContent.trim() === {text!r});
            const el = all.find(e => ![...e.children].some(c => all.includes(c)));
            if (el) el.click();
            return !!el;
        }})()""")
        if not found:
            raise LookupError(f"nothing to click with the text {text!r}")

    def screenshot(self, path: Path) -> Path:
        """The whole page: the UI scrolls inside its own containers, so the viewport is
        grown to the tallest of them for the capture."""
        height = int(self.evaluate(
            "Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))"))
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH,
                  height=min(max(height, HEIGHT), 8000), deviceScaleFactor=1, mobile=False)
        self.pump(0.5)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def chromium(binary: str, profile: Path) -> Iterator[Callable[[], Page]]:
    """Start headless Chromium on a fresh profile; yields a function that opens a page."""
    log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT)
    pages: list[Page] = []
    try:
        port = _devtools_port(proc, profile)

        def open_page() -> Page:
            target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank",
                               timeout=10).json()
            page = Page(connect(target["webSocketDebuggerUrl"], max_size=None,
                                open_timeout=10))
            for domain in ("Page", "Network", "Runtime"):
                page.send(f"{domain}.enable")
            page.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                      deviceScaleFactor=1, mobile=False)
            pages.append(page)
            return page

        yield open_page
    finally:
        for page in pages:
            page.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _devtools_port(proc: subprocess.Popen[bytes], profile: Path, timeout: float = 30) -> int:
    """Chromium writes the port it chose to DevToolsActivePort in its profile when ready."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    log = (profile.parent / "chromium.log").read_text(errors="replace")
    raise RuntimeError("Chromium did not start:\n" + log[-3000:])
