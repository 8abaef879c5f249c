"""report.html in headless Chromium: loads offline with no console errors, no network
requests, and shows the Pareto figure and table.  Screenshot: test-artifacts/report.png.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3/4,
NUL-delimited JSON), so console errors, exceptions and network requests are observed
directly rather than scraped from logs.  The session fixture installs Debian's
``chromium`` package when it is missing (needs root and the apt mirror).
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from analysis_fixtures import EXPECTED_FRONT, make_run_dir

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe"]


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() != 0:
        pytest.skip("chromium missing and not root: apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    exe = shutil.which("chromium")
    assert exe, "chromium installed but not on PATH"
    return exe


def _high_fd(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


class Chromium:
    """Minimal DevTools-protocol client over --remote-debugging-pipe."""

    def __init__(self, exe: str, profile: Path):
        r_in, self._w = (_high_fd(f) for f in os.pipe())     # we write, chromium reads fd 3
        self._r, w_out = (_high_fd(f) for f in os.pipe())    # chromium writes fd 4
        self._log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{r_in} 4>&{w_out}', "bash", exe, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(r_in, w_out), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        os.close(r_in)
        os.close(w_out)
        self._id = 0
        self._msgs: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                self._msgs.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._msgs.put(json.loads(msg))

    def _next(self, deadline: float) -> dict:
        msg = self._msgs.get(timeout=max(0.01, deadline - time.monotonic()))
        if msg is None:
            raise RuntimeError("chromium closed the DevTools pipe")
        if "method" in msg:
            self.events.append(msg)
        return msg

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e["method"] == method:
                return e
        while True:
            m = self._next(deadline)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - fall through to kill
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        self._log.close()


def render(exe: str, url: str, tmp: Path, screenshot: Path | None = None,
           width: int = 1280, height: int = 2000, js: str = "null") -> dict:
    """Load ``url``; return console errors, exceptions, error log entries, non-local
    requests and the value of the ``js`` expression; optionally save a screenshot."""
    tmp.mkdir(parents=True, exist_ok=True)
    b = Chromium(exe, tmp / "profile")
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
            b.call(m, session=s)
        b.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                      "deviceScaleFactor": 1, "mobile": False},
               session=s)
        b.events.clear()
        b.call("Page.navigate", {"url": url}, session=s)
        b.wait_event("Page.loadEventFired")
        time.sleep(0.3)  # let late console messages arrive
        value = b.call("Runtime.evaluate", {"expression": js, "returnByValue": True},
                       session=s)["result"].get("value")
        if screenshot is not None:
            shot = b.call("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
            import base64
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot))
        ev = b.events
        return {
            "console_errors": [e["params"] for e in ev if e["method"] == "Runtime.consoleAPICalled"
                               and e["params"].get("type") in ("error", "assert")],
            "exceptions": [e["params"] for e in ev if e["method"] == "Runtime.exceptionThrown"],
            "log_errors": [e["params"]["entry"] for e in ev if e["method"] == "Log.entryAdded"
                           and e["params"]["entry"].get("level") == "error"],
            "remote_requests": [e["params"]["request"]["url"] for e in ev
                                if e["method"] == "Network.requestWillBeSent"
                                and not e["params"]["request"]["url"].startswith(("file:", "data:"))],
            "value": value,
        }
    finally:
        b.close()


DOM_PROBE = """(() => {
  const imgs = [...document.querySelectorAll('img')];
  const par = document.querySelector('#fig-pareto img');
  const table = document.querySelector('table.data');
  return {
    n_img: imgs.length,
    all_loaded: imgs.every(i => i.complete && i.naturalWidth > 0),
    pareto_w: par ? par.naturalWidth : 0,
    pareto_src_data: par ? par.src.startsWith('data:image/png;base64,') : false,
    pareto_rows: table ? [...table.querySelectorAll('tbody tr')].map(r => r.cells[0].textContent) : [],
    masking_rows: document.querySelectorAll('tr.masking').length,
    scripts: document.querySelectorAll('script').length,
    links: document.querySelectorAll('link[href]').length,
    text: document.body.innerText.slice(0, 4000),
  };
})()"""


def test_detector_sees_console_errors_and_requests(chromium_bin, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom')</script>"
                   "<img src='http://example.invalid/x.png'></body></html>")
    out = render(chromium_bin, bad.as_uri(), tmp_path / "c")
    assert any("boom" in json.dumps(e) for e in out["console_errors"])
    assert any("example.invalid" in u for u in out["remote_requests"])


def test_report_renders_offline_in_chromium(chromium_bin, tmp_path):
    from analysis.report import write_report

    run = make_run_dir(tmp_path / "run")
    res = write_report(run)
    shot = ARTIFACTS / "report.png"
    out = render(chromium_bin, res.paths["report.html"].as_uri(), tmp_path / "c", screenshot=shot,
                 js=DOM_PROBE)
    assert out["console_errors"] == [] and out["exceptions"] == [] and out["log_errors"] == [], out
    assert out["remote_requests"] == []
    v = out["value"]
    assert v["n_img"] == 5 and v["all_loaded"] and v["pareto_w"] > 400 and v["pareto_src_data"]
    assert set(v["pareto_rows"]) == EXPECTED_FRONT
    assert v["masking_rows"] >= 1
    assert v["scripts"] == 0 and v["links"] == 0
    assert "autoattack Linf ε=8/255 (n=200)" in v["text"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
