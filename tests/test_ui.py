"""The live view at /ui: served from the package, no external resources, and, in a real
headless Chromium against a real server, it renders the queue's numbers and follows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import asyncpg
import httpx
import pytest

from sluice.access.keys import issue_key
from sluice.api.routes.ui import _ASSETS
from sluice.storage import migrate
from tests.browser import REQUIRE_ENV, require_chromium
from tests.conftest import ROOT
from tests.helpers import assert_problem

STATIC = ROOT / "app" / "static"
ARTIFACTS = ROOT / "artifacts"


# ---- served as static files, self-contained -------------------------------------------------


async def test_ui_page_and_assets_are_served(client):
    r = await client.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    for asset, media in _ASSETS.items():
        assert f"/ui/{asset}" in page
        a = await client.get(f"/ui/{asset}")
        assert a.status_code == 200
        assert a.headers["content-type"] == media
        assert a.content == (STATIC / asset).read_bytes()
    assert_problem(await client.get("/ui/../app/main.py"), 404)
    assert_problem(await client.get("/ui/nothing.js"), 404)


def test_ui_is_served_from_the_package_wherever_the_service_runs(tmp_path):
    """The page comes from the installed `sluice` package, not from a folder named app/ that
    only exists (and is importable) next to a checkout: `sluice serve`, a console script,
    does not have the checkout on its path."""
    script = (
        "import asyncio, httpx\n"
        "from sluice.main import create_app\n"
        "from sluice.settings import Settings\n"
        "app = create_app(Settings(DATABASE_URL='postgresql://u@127.0.0.1:1/d'))\n"
        "async def main():\n"
        "    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)\n"
        "    async with httpx.AsyncClient(transport=transport, base_url='http://t') as c:\n"
        "        for path in ('/ui', '/ui/ui.js', '/ui/ui.css'):\n"
        "            print(path, (await c.get(path)).status_code)\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no app/ here
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["/ui", "200", "/ui/ui.js", "200", "/ui/ui.css", "200"], (
        done.stdout,
        done.stderr[-2000:],
    )


def test_ui_loads_nothing_from_elsewhere():
    """No CDN, no web fonts: the page works offline. The only absolute URL is the SVG
    namespace, which is a name, not a download."""
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert "@import" not in text and 'fetch("http' not in text


def test_ui_is_in_the_openapi_document_as_html():
    from sluice.cli import openapi_document

    paths = openapi_document()["paths"]
    assert "text/html" in paths["/ui"]["get"]["responses"]["200"]["content"]
    assert not [p for p in paths if p.startswith("/ui/")]


# ---- a real browser ---------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    return require_chromium()


@pytest.mark.parametrize("ci", [None, "true"])
def test_without_a_browser_the_browser_tests_skip_unless_required(monkeypatch, tmp_path, ci):
    """CI=true alone (what GitHub-style runners set) does not demand a browser: only
    SLUICE_REQUIRE_BROWSER=1, which .ci/run exports after installing Chromium, does."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser to be found
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no Chromium on PATH"):
        require_chromium()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SLUICE_REQUIRE_BROWSER is set"):
        require_chromium()


def test_ci_script_requires_the_browser_it_installs():
    script = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in script and "chromium" in script
    assert f"export {REQUIRE_ENV}=1" in script


class Page(HTMLParser):
    """What the test needs from the dumped DOM: rows by data-* and their data-field cells."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.subs: dict[tuple[str, str], dict[str, str]] = {}
        self.topics: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self._tbody: str | None = None
        self._row: dict[str, str] | None = None
        self._field: str | None = None
        self._id: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "tbody":
            self._tbody = a.get("id")
        elif tag == "tr" and self._tbody == "subs-body":
            self._row = self.subs.setdefault((a["data-topic"], a["data-subscription"]), {})
        elif tag == "tr" and self._tbody == "topics-body":
            self._row = self.topics.setdefault(a["data-topic"], {})
        elif tag == "td" and self._row is not None and "data-field" in a:
            self._field = a["data-field"]
            self._row[self._field] = ""
        if "id" in a and tag in ("div", "pre", "span"):
            self._id = a["id"]
            self.ids[self._id] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._tbody = None
        elif tag == "tr":
            self._row = None
        elif tag == "td":
            self._field = None
        if tag in ("div", "pre", "span"):
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self._row[self._field] += data
        if self._id is not None:
            self.ids[self._id] += data


def run_browser(
    binary: str, url: str, profile: Path, *flags: str, budget_ms: int = 6000
) -> tuple[str, list[str]]:
    """Loads the page in headless Chromium; returns (stdout, console messages)."""
    profile.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--virtual-time-budget={budget_ms}",
        *flags,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # Every console message (errors, failed loads, uncaught exceptions) is logged as CONSOLE.
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def load(binary: str, url: str, profile: Path) -> Page:
    html, console = run_browser(binary, url, profile, "--dump-dom")
    assert console == [], console
    page = Page(html)
    assert page.ids.get("js-errors", "") == "", page.ids["js-errors"]
    assert page.body.get("data-state") == "live", page.body
    assert int(page.body.get("data-polls", "0")) >= 2, page.body  # it polls, not just loads
    return page


def test_live_view_in_a_browser(chromium, server_factory, fresh_db_url, tmp_path):
    server = server_factory(url=fresh_db_url)
    base = server.base_url
    c = httpx.Client(base_url=base, timeout=10)

    def ok(response: httpx.Response) -> dict:
        assert response.status_code in (200, 201), response.text
        return response.json() if response.content else {}

    ok(c.put("/v1/topics/orders", json={}))
    ok(c.put("/v1/topics/payments", json={"retention_seconds": 86400}))
    for sub in ("billing", "audit"):
        ok(c.put(f"/v1/topics/orders/subscriptions/{sub}", json={"start": "earliest"}))
    ok(c.put("/v1/topics/payments/subscriptions/ledger", json={"start": "earliest"}))
    ok(c.post("/v1/topics/orders/messages", json={"messages": [{"value": i} for i in range(3)]}))
    leased = ok(c.post("/v1/topics/orders/subscriptions/billing/pull", json={"max_messages": 1}))
    assert len(leased["messages"]) == 1

    page = load(chromium, base + "/ui", tmp_path / "p1")
    billing = page.subs[("orders", "billing")]
    assert (billing["backlog"], billing["in_flight"], billing["lag"]) == ("2", "1", "3")
    audit = page.subs[("orders", "audit")]
    assert (audit["backlog"], audit["in_flight"], audit["lag"]) == ("3", "0", "3")
    assert page.subs[("payments", "ledger")]["backlog"] == "0"
    assert page.topics["orders"]["message_count"] == "3"
    assert page.topics["orders"]["head_offset"] == "2"
    assert page.topics["payments"]["retention"].strip() == "1 d"
    assert page.ids["total-subs"] == "3"
    assert page.ids["total-backlog"] == "5"

    # The queue moves; so do the numbers.
    ok(c.post("/v1/topics/orders/messages", json={"messages": [{"value": i} for i in range(5)]}))
    receipt = leased["messages"][0]["receipt"]
    acked = ok(c.post("/v1/topics/orders/subscriptions/billing/ack", json={"receipts": [receipt]}))
    assert acked["acked"] == 1
    page = load(chromium, base + "/ui", tmp_path / "p2")
    billing = page.subs[("orders", "billing")]
    assert (billing["backlog"], billing["in_flight"], billing["lag"]) == ("7", "0", "7")
    assert page.subs[("orders", "audit")]["backlog"] == "8"
    assert page.topics["orders"]["message_count"] == "8"
    assert page.ids["total-backlog"] == "15"

    # A screenshot with traffic flowing, to look at (artifacts/ is not committed).
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=base, timeout=10) as t:
            while not stop.is_set():
                t.post("/v1/topics/orders/messages", json={"messages": [{"value": 1}] * 20})
                t.post("/v1/topics/payments/messages", json={"messages": [{"value": 2}] * 5})
                got = t.post(
                    "/v1/topics/orders/subscriptions/billing/pull", json={"max_messages": 15}
                ).json()["messages"]
                t.post(
                    "/v1/topics/orders/subscriptions/billing/ack",
                    json={"receipts": [m["receipt"] for m in got]},
                )
                stop.wait(0.02)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui.png"
    shot.unlink(missing_ok=True)
    try:
        _, console = run_browser(
            chromium,
            base + "/ui",
            tmp_path / "p3",
            "--hide-scrollbars",
            "--window-size=1400,1100",
            f"--screenshot={shot}",
            budget_ms=20000,
        )
    finally:
        stop.set()
        worker.join(10)
        c.close()
    assert console == [], console
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


async def test_live_view_asks_for_an_api_key_once_keys_exist(
    chromium, server_factory, fresh_db_url, tmp_path
):
    await migrate.upgrade(fresh_db_url)
    conn = await asyncpg.connect(fresh_db_url)
    try:
        await issue_key(conn, ["admin"], "ui-test")
    finally:
        await conn.close()
    server = server_factory(url=fresh_db_url)
    assert httpx.get(server.base_url + "/ui").status_code == 200  # the page itself is open
    html, console = run_browser(chromium, server.base_url + "/ui", tmp_path / "p", "--dump-dom")
    page = Page(html)
    assert page.body.get("data-state") == "auth", page.body
    assert page.ids["status-text"] == "API key needed"
    assert re.search(r'<section id="key-panel" class="key-panel">', html), "key form not shown"
    assert page.ids.get("js-errors", "") == ""
    # Refused requests are an expected state here, not an error of the page.
    assert all("status of 401" in line for line in console), console
