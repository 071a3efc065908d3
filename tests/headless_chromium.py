"""Opens a page in headless Chromium (Debian's ``chromium``) and reports what
went wrong there, with a screenshot.

The browser is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file
descriptors 3 and 4), so nothing beyond the standard library and the
``chromium`` package is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pathlib
import select
import shutil
import signal
import tempfile
import time
from typing import List, NamedTuple, Optional


class PageReport(NamedTuple):
    """What happened while a page loaded.

    Attributes:
        errors: console errors and assertions, uncaught exceptions, error log
            entries (e.g. a resource that failed to load), failed requests and
            HTTP responses >= 400, one line each.
        requests: the URL of every request the page made.
        screenshot: the whole page as PNG bytes.
        size: (width, height) of the page in CSS pixels.
    """

    errors: List[str]
    requests: List[str]
    screenshot: bytes
    size: tuple


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Browser:
    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.TemporaryDirectory(prefix="gl-chromium-")
        self.log = open(os.path.join(self.profile.name, "chromium.log"), "wb")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Out of the way of 0-4, so that the dup2s below cannot clobber them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        args = [
            binary,
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.pid = os.posix_spawn(
            binary,
            args,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, high[0], 3),
                (os.POSIX_SPAWN_DUP2, high[1], 4),
                (os.POSIX_SPAWN_DUP2, self.log.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, self.log.fileno(), 2),
            ],
            setsid=True,
        )
        for fd in high:
            os.close(fd)
        self.write_fd, self.read_fd = to_chrome_w, from_chrome_r
        self.buffer = b""
        self.next_id = 0
        self.events: List[dict] = []

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read(self, deadline: float) -> Optional[dict]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited; its log: {self.log_text()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(line)

    def call(self, method: str, params=None, session=None, timeout: float = 30.0) -> dict:
        want = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            if msg is None:
                raise TimeoutError(f"chromium: no answer to {method} in {timeout} s")
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"chromium: {method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e["method"] == method:
                return e
        while True:
            msg = self._read(deadline)
            if msg is None:
                raise TimeoutError(f"chromium: no {method} in {timeout} s")
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            msg = self._read(deadline)
            if msg is None:
                return
            if "method" in msg:
                self.events.append(msg)

    def log_text(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except OSError:
            pass
        deadline = time.monotonic() + 10
        done = False
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                done = True
                break
            time.sleep(0.05)
        if not done:
            # The browser and its helpers share the session it was started in.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
        for fd in (self.write_fd, self.read_fd):
            os.close(fd)
        self.log.close()
        self.profile.cleanup()


def _describe(event: dict) -> Optional[str]:
    method, p = event["method"], event.get("params", {})
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        return f"console.{p['type']}: {text}"
    if method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return f"exception: {d.get('exception', {}).get('description') or d.get('text')}"
    if method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        return f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip()
    if method == "Network.loadingFailed" and not p.get("canceled"):
        return f"failed load: {p.get('errorText')} ({p.get('type')})"
    if method == "Network.responseReceived":
        r = p.get("response", {})
        if r.get("status", 0) >= 400:
            return f"HTTP {r['status']}: {r.get('url')}"
    return None


def open_page(
    path_or_url, *, width: int = 1280, height: int = 900, timeout: float = 120.0
) -> PageReport:
    """Loads ``path_or_url`` (a file path or URL) in headless Chromium, waits
    for its load event and a moment more, and returns the errors seen, the
    requests made and a screenshot of the whole page."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium: not found on PATH (apt-get install chromium)")
    url = str(path_or_url)
    if "://" not in url and not url.startswith(("about:", "data:")):
        url = pathlib.Path(url).resolve().as_uri()
    b = _Browser(binary, width, height)
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
        s = b.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            b.call(f"{domain}.enable", session=s)
        b.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        nav = b.call("Page.navigate", {"url": url}, session=s, timeout=timeout)
        errors = [f"navigation: {nav['errorText']}"] if nav.get("errorText") else []
        b.wait_event("Page.loadEventFired", timeout)
        b.drain(0.5)
        metrics = b.call("Page.getLayoutMetrics", session=s)
        content = metrics.get("cssContentSize") or metrics["contentSize"]
        w, h = int(content["width"]), int(content["height"])
        shot = b.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1},
            },
            session=s,
            timeout=timeout,
        )
        b.drain(0.2)
    finally:
        b.close()
    requests = []
    for e in b.events:
        if e["method"] == "Network.requestWillBeSent":
            requests.append(e["params"]["request"]["url"])
        line = _describe(e)
        if line:
            errors.append(line)
    return PageReport(errors, requests, base64.b64decode(shot["data"]), (w, h))
