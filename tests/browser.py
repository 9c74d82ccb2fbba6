"""Headless Chromium for the browser tests: finding it, and driving it over the DevTools
protocol (a WebSocket; the `websockets` package) with the network cut off.

Whether a missing browser fails or skips a test: it fails only when SLUICE_REQUIRE_BROWSER=1
(`.ci/run` exports it, after installing Chromium); otherwise the test is skipped with the
reason. A CI variable alone does not decide it: runners of other CI systems set CI=true
without having a browser, and the README's test command must pass there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRE_ENV = "SLUICE_REQUIRE_BROWSER"


def require_chromium() -> str:
    """The Chromium binary; skips the test without one, or fails it where it is required."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(
            f"{REQUIRE_ENV} is set but no Chromium is installed (apt-get install chromium): "
            "the browser tests must run here"
        )
    pytest.skip(
        "browser test skipped: no Chromium on PATH (apt-get install chromium; "
        f"set {REQUIRE_ENV}=1 to make a missing browser fail instead)"
    )


# Flags every headless run gets: no first-run UI, no background traffic of the browser's own.
BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
)


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_flags() -> tuple[str, ...]:
    """Cut the browser off every host but 127.0.0.1: names resolve to nothing, and every
    request that is not for 127.0.0.1 goes to a proxy that does not exist. No packet for an
    outside host leaves the machine."""
    return (
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{_dead_port()}",
        "--proxy-bypass-list=127.0.0.1",
    )


class CDPError(RuntimeError):
    pass


class Tab:
    """One page of a headless Chromium, driven over the DevTools protocol.

    Every protocol event is kept (`events`), so a test can check afterwards which URLs the
    page requested, what failed to load and what went to the console."""

    def __init__(self, binary: str, profile: Path, *, offline: bool = True) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        command = [
            binary,
            *BASE_FLAGS,
            *(offline_flags() if offline else ()),
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1280,2000",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            port, path = self._devtools_address()
            self._ws = connect(
                f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10, proxy=None
            )
            self._next_id = 0
            self.events: list[dict[str, Any]] = []
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_address(self) -> tuple[int, str]:
        """Chromium writes its DevTools port and browser path to DevToolsActivePort."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                lines = marker.read_text().split()
                if len(lines) >= 2:
                    return int(lines[0]), lines[1]
            time.sleep(0.05)
        raise CDPError("chromium did not open its DevTools port")

    # ---- the protocol -------------------------------------------------------------------

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + 60
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"no answer to {method}")
            reply = json.loads(self._ws.recv(timeout=remaining))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """A command for the page (its session)."""
        return self.call(method, self._session, **params)

    def pump(self, seconds: float) -> None:
        """Collect events for a while."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = json.loads(self._ws.recv(timeout=remaining))
            except TimeoutError:
                return
            if "method" in reply:
                self.events.append(reply)

    # ---- what a person does -------------------------------------------------------------

    def navigate(self, url: str) -> dict[str, Any]:
        """Loads url; the answer has `errorText` when the load failed (e.g. no network)."""
        return self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Evaluates expression until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            self.pump(0.1)

    def _center(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2];
            }})()"""
        )
        if box is None:
            raise AssertionError(f"nothing on the page matches {selector}")
        return box[0], box[1]

    def click(self, selector: str) -> None:
        """A left click in the middle of the element, as the mouse would do it."""
        x, y = self._center(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        """Click the field, select what it holds, and type text over it."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.send("Input.insertText", text=text)

    # ---- what happened ------------------------------------------------------------------

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    def problems(self, warnings: bool = True) -> list[str]:
        """Console errors (and warnings), uncaught exceptions, failed loads, CSP reports."""
        levels = ("error", "warning") if warnings else ("error",)
        found = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails']}")
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in levels:
                found.append(f"console.{p['type']}: {[a.get('value') for a in p['args']]}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in levels:
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif e["method"] == "Network.loadingFailed" and not p.get("canceled"):
                found.append(f"failed load: {p.get('errorText')} {p.get('blockedReason', '')}")
        return found

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def open_tab(binary: str, profile: Path, *, offline: bool = True) -> Iterator[Tab]:
    tab = Tab(binary, profile, offline=offline)
    try:
        yield tab
    finally:
        tab.close()
