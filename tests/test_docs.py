"""Swagger UI (/docs) and ReDoc (/redoc) work without internet: every asset comes from the
app. Checked over HTTP, and in a real headless Chromium cut off from every host but
127.0.0.1, where an operation is tried out from the page: publish, then browse."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import asyncpg
import httpx
import pytest

from sluice.access.keys import issue_key
from sluice.storage import migrate
from tests.browser import Tab, open_tab, require_chromium
from tests.conftest import ROOT, run_app, unique
from tests.helpers import assert_problem

ARTIFACTS = ROOT / "artifacts"
PUBLISH = "#operations-topics-publish_v1_topics__topic__messages_post"
BROWSE = "#operations-topics-browse_v1_topics__topic__messages_get"


class Links(HTMLParser):
    """Every URL a page loads by itself: script src, link href, img src."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href", "spec-url"):
            if a.get(name):
                self.urls.append(a[name] or "")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def _bundle_version(js: bytes) -> tuple[int, ...]:
    found = re.search(rb'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', js)
    assert found, "no version in swagger-ui-bundle.js"
    return tuple(int(part) for part in found.groups())


async def test_docs_pages_load_every_asset_from_the_app(client):
    for page, title in (("/docs", "Swagger UI"), ("/redoc", "ReDoc")):
        r = await client.get(page)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert f"<title>Sluice - {title}</title>" in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp
        links = Links(r.text)
        assert links.inline_scripts == 0  # so that the CSP needs no 'unsafe-inline' script
        assert links.urls, page
        for url in links.urls:
            # Relative to this origin: no scheme, no host, nothing from a CDN.
            assert url.startswith("/") and not url.startswith("//"), (page, url)
            asset = await client.get(url)
            assert asset.status_code == 200, (page, url)
            assert asset.content, url
    assert not re.search(r"(?:https?:)?//", (await client.get("/docs")).text)

    init = await client.get("/docs/assets/swagger-init.js")
    assert init.headers["content-type"].startswith("text/javascript")
    assert '"url": "/openapi.json"' in init.text
    assert '"validatorUrl": null' in init.text  # no badge fetched from swagger.io
    bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert _bundle_version(bundle.content) >= (5, 0, 0)  # Swagger UI 5 renders OpenAPI 3.1
    css = await client.get("/docs/assets/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")
    icon = await client.get("/docs/assets/favicon.png")
    assert icon.content[:8] == b"\x89PNG\r\n\x1a\n"

    # Revalidation is cheap, and unknown names are problems like any other 404.
    again = await client.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": bundle.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content
    assert_problem(await client.get("/docs/assets/nothing.js"), 404)
    assert_problem(await client.get("/docs/assets/..%2Fmain.py"), 404)


async def test_docs_routes_are_not_in_the_openapi_document(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]


async def test_docs_stay_open_once_api_keys_exist(fresh_db_url):
    await migrate.upgrade(fresh_db_url)
    conn = await asyncpg.connect(fresh_db_url)
    try:
        await issue_key(conn, ["admin"], "docs-test")
    finally:
        await conn.close()
    async with run_app(fresh_db_url) as h:
        assert_problem(await h.client.get("/v1/topics"), 401)  # keys are enforced
        for path in (
            "/docs",
            "/redoc",
            "/openapi.json",
            "/docs/assets/swagger-ui-bundle.js",
            "/docs/assets/swagger-ui.css",
            "/docs/assets/swagger-init.js",
            "/docs/assets/redoc.standalone.js",
            "/docs/assets/favicon.png",
        ):
            assert (await h.client.get(path)).status_code == 200, path
        # The document tells Swagger UI how to authorize (its "Authorize" button).
        schemes = (await h.client.get("/openapi.json")).json()["components"]["securitySchemes"]
        assert schemes["bearerAuth"]["scheme"] == "bearer"


# ---- a real browser, offline ------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    return require_chromium()


def _assert_offline(tab: Tab) -> None:
    """The browser cannot reach anything but 127.0.0.1: the CDN FastAPI's page would use
    fails to load. Then forget those events: the rest of the test checks the page's own."""
    for outside in (
        "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css",
        "http://example.com/",
    ):
        answer = tab.navigate(outside)
        assert answer.get("errorText", "").startswith("net::ERR_"), (outside, answer)
    tab.navigate("about:blank")
    tab.pump(0.3)  # the error pages' own events arrive late
    tab.events.clear()


def _only_local_requests(tab: Tab, base: str) -> None:
    urls = tab.requested_urls()
    assert urls
    elsewhere = [u for u in urls if not u.startswith((base + "/", "data:", "blob:" + base))]
    assert elsewhere == [], elsewhere
    assert tab.problems() == []


def _execute(tab: Tab, op: str, topic: str, body: str | None = None) -> tuple[str, object]:
    """Open an operation, "Try it out", fill it in, "Execute"; returns the status and the
    response body the page shows."""
    tab.click(f"{op} .opblock-summary-control")
    tab.wait_for(f"!!document.querySelector('{op} .try-out__btn')", what="Try it out")
    tab.click(f"{op} .try-out__btn")
    field = f"{op} tr[data-param-name=topic] input"
    tab.wait_for(f"!!document.querySelector('{field}')", what="the topic field")
    tab.type_into(field, topic)
    if body is not None:
        tab.type_into(f"{op} textarea.body-param__text", body)
    tab.click(f"{op} .execute")
    cell = f"{op} .live-responses-table tbody .response-col_status"
    status = tab.wait_for(
        f"(document.querySelector('{cell}') || {{}}).innerText", what="the server response"
    )
    shown = tab.evaluate(
        f"document.querySelector('{op} .live-responses-table tbody .highlight-code pre').innerText"
    )
    return status.strip(), json.loads(shown)


def test_swagger_ui_offline_publish_then_browse(chromium, server_factory, tmp_path):
    server = server_factory()
    base = server.base_url
    topic = unique("docs")
    assert httpx.put(f"{base}/v1/topics/{topic}", json={}).status_code == 201
    marker = unique("from-swagger-ui")

    with open_tab(chromium, tmp_path / "profile") as tab:
        _assert_offline(tab)
        tab.navigate(base + "/docs")
        # Rendered: the OpenAPI 3.1 document is parsed and every operation is listed.
        tab.wait_for("document.querySelectorAll('.opblock').length > 10", what="operations")
        title = tab.evaluate("document.querySelector('.info .title').innerText")
        assert "Sluice" in title and "OAS 3.1" in title
        assert not tab.evaluate("!!document.querySelector('.errors-wrapper')")

        body = json.dumps({"messages": [{"value": {"note": marker}, "key": "k1"}]})
        status, shown = _execute(tab, PUBLISH, topic, body)
        assert status == "201", shown
        assert shown == {"messages": [{"offset": 0, "duplicate": False}]}

        status, shown = _execute(tab, BROWSE, topic)
        assert status == "200", shown
        [message] = shown["messages"]  # type: ignore[index]
        assert message["value"] == {"note": marker}
        assert message["key"] == "k1"
        # And it is on the page for a person to read.
        page_text = tab.evaluate(f"document.querySelector('{BROWSE}').innerText")
        assert marker in page_text

        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(ARTIFACTS / "docs.png")
        _only_local_requests(tab, base)

    # The page really went to the server: the message is there for any client.
    stored = httpx.get(f"{base}/v1/topics/{topic}/messages").json()["messages"]
    assert [m["value"] for m in stored] == [{"note": marker}]


def test_redoc_renders_offline(chromium, server_factory, tmp_path):
    server = server_factory()
    with open_tab(chromium, tmp_path / "profile") as tab:
        _assert_offline(tab)
        tab.navigate(server.base_url + "/redoc")
        tab.wait_for(
            "!!document.body"
            " && document.body.innerText.includes('Publish 1..1000 messages atomically')",
            what="the operations in ReDoc",
        )
        assert "Sluice" in tab.evaluate("document.querySelector('h1').innerText")
        tab.pump(0.5)  # let the search worker start
        # ReDoc's side menu always shows a "by Redocly" logo from its CDN. The page's CSP
        # blocks that one image in the browser itself (it falls back to text): no request
        # leaves, and nothing else is fetched from anywhere but the app.
        logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
        local = (server.base_url + "/", "data:", "blob:" + server.base_url)
        blocked = {
            e["params"]["requestId"]
            for e in tab.events
            if e["method"] == "Network.loadingFailed" and e["params"].get("blockedReason") == "csp"
        }
        sent = [
            e["params"]
            for e in tab.events
            if e["method"] == "Network.requestWillBeSent"
            and not e["params"]["request"]["url"].startswith(local)
        ]
        assert all(p["request"]["url"] == logo and p["requestId"] in blocked for p in sent), sent
        # (ReDoc warns on the console about `null` in the oneOf of some request schemas.)
        errors = tab.problems(warnings=False)
        assert [p for p in errors if logo not in p and p != "failed load:  csp"] == [], errors
