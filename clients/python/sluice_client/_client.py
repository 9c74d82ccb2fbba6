"""`Client` (sync) and `AsyncClient` (async): one method per API operation.

Both share the request building and answer parsing of `_Operations`; its methods return
whatever `_run` returns: the result for `Client`, an awaitable of it for `AsyncClient`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from ._errors import connection_error, error_from_response
from ._models import (
    AckResult,
    BrowsePage,
    DeadLetterMessage,
    DeadLetterPage,
    Delivery,
    ExtendResult,
    Message,
    NackResult,
    OutgoingMessage,
    Page,
    PublishResult,
    PullResult,
    RedriveResult,
    SeekResult,
    Subscription,
    Topic,
)

__version__ = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "leave this setting as it is" (distinct from None, which clears a nullable setting)
UNSET: Any = _Unset()

_SUBSCRIPTION_SETTINGS = (
    "ack_deadline_seconds",
    "max_deliveries",
    "retry_min_seconds",
    "retry_max_seconds",
    "dead_letter_topic",
    "ordered_by_key",
    "rate_limit_per_second",
    "rate_limit_burst",
    "max_in_flight",
)

Receipts = Iterable[str | Delivery]
MessageLike = OutgoingMessage | Mapping[str, Any]


@dataclass
class _Request:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, Any] | None = None
    body: Any = None
    extra_timeout: float = 0.0


@dataclass(frozen=True)
class _EncodedJSON:
    """A request body serialized already (the Publisher encodes each message once, when it
    is buffered: that also gives its size)."""

    data: bytes


def _q(name: str) -> str:
    return quote(str(name), safe="")


def _receipts(receipts: Receipts) -> list[str]:
    return [r.receipt if isinstance(r, Delivery) else str(r) for r in receipts]


def _plain_json(body: dict[str, Any]) -> _EncodedJSON:
    """A body of receipts, counts and seconds (no message values), encoded by orjson when
    it is installed: the body of every pull, ack, nack and extend of a Worker. orjson writes
    NaN and infinities as null where json refuses them: those go to json, which raises."""
    if _dumps is not None and all(type(v) is not float or math.isfinite(v) for v in body.values()):
        return _EncodedJSON(_dumps(body))
    return _EncodedJSON(json.dumps(body, allow_nan=False).encode())


def to_outgoing(message: MessageLike) -> OutgoingMessage:
    if isinstance(message, OutgoingMessage):
        return message
    if isinstance(message, Mapping):
        return OutgoingMessage(**message)
    raise TypeError("a message is an OutgoingMessage or a mapping with 'value'")


def _json(response: httpx.Response) -> Any:
    return response.json()


try:  # optional: decodes a pull's payloads several times faster; not a dependency
    from orjson import dumps as _dumps
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _dumps = None
    _loads = json.loads


def _pull_result(d: dict[str, Any]) -> PullResult:
    return PullResult(
        messages=[Delivery.from_json(m) for m in d["messages"]],
        acked=d.get("acked"),
        stale=list(d.get("stale") or []),
    )


def resolve_config(
    base_url: str | None, api_key: str | None, headers: Mapping[str, str] | None
) -> tuple[str, dict[str, str]]:
    url = (base_url or os.environ.get("SLUICE_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("SLUICE_API_KEY")
    all_headers = {"user-agent": f"sluice-client/{__version__}"}
    if key:
        all_headers["authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    return url, all_headers


class _Operations:
    timeout: float

    def _run(self, request: _Request) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _finish(self, request: _Request, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise error_from_response(response)
        return request.parse(response)

    # ---- topics ---------------------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        *,
        retention_seconds: int | None = None,
        dedup_window_seconds: int | None = None,
        max_message_bytes: int | None = None,
    ) -> Topic:
        """PUT the topic: creates it (Topic.created is True) or changes only the settings
        given (PUT is a merge)."""
        body = {
            k: v
            for k, v in {
                "retention_seconds": retention_seconds,
                "dedup_window_seconds": dedup_window_seconds,
                "max_message_bytes": max_message_bytes,
            }.items()
            if v is not None
        }
        return self._run(
            _Request(
                "PUT",
                f"/v1/topics/{_q(name)}",
                lambda r: Topic.from_json(r.json(), created=r.status_code == 201),
                body=body,
            )
        )

    put_topic = create_topic
    update_topic = create_topic

    def get_topic(self, name: str) -> Topic:
        return self._run(
            _Request("GET", f"/v1/topics/{_q(name)}", lambda r: Topic.from_json(r.json()))
        )

    def list_topics(self, *, after: str | None = None, limit: int = 100) -> Page[Topic]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._run(
            _Request(
                "GET",
                "/v1/topics",
                lambda r: Page(
                    [Topic.from_json(t) for t in r.json()["topics"]], r.json()["next_after"]
                ),
                params=params,
            )
        )

    def delete_topic(self, name: str) -> None:
        return self._run(_Request("DELETE", f"/v1/topics/{_q(name)}", lambda r: None))

    # ---- messages -------------------------------------------------------------------------

    def publish(self, topic: str, messages: Iterable[MessageLike]) -> list[PublishResult]:
        """Publish 1..1000 messages atomically; one PublishResult per message, in order."""
        body = {"messages": [to_outgoing(m).to_json() for m in messages]}
        return self._publish_body(topic, body)

    def _publish_encoded(self, topic: str, encoded: list[bytes]) -> list[PublishResult]:
        """publish() of messages each serialized already as a JSON object."""
        body = _EncodedJSON(b'{"messages":[' + b",".join(encoded) + b"]}")
        return self._publish_body(topic, body)

    def _publish_body(self, topic: str, body: dict[str, Any] | _EncodedJSON) -> Any:
        return self._run(
            _Request(
                "POST",
                f"/v1/topics/{_q(topic)}/messages",
                lambda r: [
                    PublishResult(m["offset"], m["duplicate"]) for m in r.json()["messages"]
                ],
                body=body,
            )
        )

    def publish_one(
        self,
        topic: str,
        value: Any,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay_seconds: int = 0,
        dedup_id: str | None = None,
    ) -> PublishResult:
        msg = OutgoingMessage(value, key, headers, delay_seconds, dedup_id)
        return self._run(
            _Request(
                "POST",
                f"/v1/topics/{_q(topic)}/messages",
                lambda r: PublishResult(**r.json()["messages"][0]),
                body={"messages": [msg.to_json()]},
            )
        )

    def browse(self, topic: str, *, from_offset: int = 0, limit: int = 100) -> BrowsePage:
        """One page of stored messages from `from_offset` (nothing is consumed)."""
        return self._run(
            _Request(
                "GET",
                f"/v1/topics/{_q(topic)}/messages",
                lambda r: BrowsePage(
                    [Message.from_json(m) for m in r.json()["messages"]], r.json()["next_offset"]
                ),
                params={"from_offset": from_offset, "limit": limit},
            )
        )

    def get_message(self, topic: str, offset: int) -> Message:
        return self._run(
            _Request(
                "GET",
                f"/v1/topics/{_q(topic)}/messages/{int(offset)}",
                lambda r: Message.from_json(r.json()),
            )
        )

    # ---- subscriptions --------------------------------------------------------------------

    def _put_subscription(
        self, topic: str, name: str, start: str | None, settings: dict[str, Any]
    ) -> Any:
        body = {k: v for k, v in settings.items() if v is not UNSET}
        unknown = set(body) - set(_SUBSCRIPTION_SETTINGS)
        if unknown:
            raise TypeError(f"unknown subscription settings: {sorted(unknown)}")
        if start is not None:
            body["start"] = start
        return self._run(
            _Request(
                "PUT",
                f"/v1/topics/{_q(topic)}/subscriptions/{_q(name)}",
                lambda r: Subscription.from_json(r.json(), created=r.status_code == 201),
                body=body,
            )
        )

    def create_subscription(
        self, topic: str, name: str, *, start: str | None = None, **settings: Any
    ) -> Subscription:
        """PUT the subscription: `start` ("latest" by default, or "earliest") applies only
        when it is created. Settings: ack_deadline_seconds, max_deliveries,
        retry_min_seconds, retry_max_seconds, dead_letter_topic, ordered_by_key,
        rate_limit_per_second, rate_limit_burst, max_in_flight (None clears a nullable one)."""
        return self._put_subscription(topic, name, start, settings)

    def update_subscription(self, topic: str, name: str, **settings: Any) -> Subscription:
        """Change only the settings given (PUT is a merge)."""
        return self._put_subscription(topic, name, None, settings)

    def get_subscription(self, topic: str, name: str) -> Subscription:
        """Settings and stats (backlog, in_flight, delayed, lag, committed_offset, ...)."""
        return self._run(
            _Request(
                "GET",
                f"/v1/topics/{_q(topic)}/subscriptions/{_q(name)}",
                lambda r: Subscription.from_json(r.json()),
            )
        )

    stats = get_subscription

    def list_subscriptions(
        self, topic: str, *, after: str | None = None, limit: int = 100
    ) -> Page[Subscription]:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._run(
            _Request(
                "GET",
                f"/v1/topics/{_q(topic)}/subscriptions",
                lambda r: Page(
                    [Subscription.from_json(s) for s in r.json()["subscriptions"]],
                    r.json()["next_after"],
                ),
                params=params,
            )
        )

    def delete_subscription(self, topic: str, name: str) -> None:
        return self._run(
            _Request("DELETE", f"/v1/topics/{_q(topic)}/subscriptions/{_q(name)}", lambda r: None)
        )

    # ---- consuming ------------------------------------------------------------------------

    def _sub_path(self, topic: str, subscription: str, tail: str) -> str:
        return f"/v1/topics/{_q(topic)}/subscriptions/{_q(subscription)}/{tail}"

    def pull(
        self,
        topic: str,
        subscription: str,
        *,
        max_messages: int = 1,
        wait_seconds: float = 0,
        ack: Receipts | None = None,
        ack_deadline_seconds: int | None = None,
    ) -> PullResult:
        """Lease up to `max_messages`, waiting up to `wait_seconds` (0..20) for the first.
        `ack`: receipts to acknowledge in the same request (then `acked`/`stale` are set;
        on an error they stay applied, see SluiceError.acked)."""
        body: dict[str, Any] = {"max_messages": max_messages, "wait_seconds": wait_seconds}
        if ack:
            body["ack"] = _receipts(ack)
        if ack_deadline_seconds is not None:
            body["ack_deadline_seconds"] = ack_deadline_seconds
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "pull"),
                lambda r: _pull_result(_loads(r.content)),
                body=_plain_json(body),
                extra_timeout=float(wait_seconds),
            )
        )

    def ack(self, topic: str, subscription: str, receipts: Receipts) -> AckResult:
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "ack"),
                lambda r: AckResult(r.json()["acked"], r.json()["stale"]),
                body=_plain_json({"receipts": _receipts(receipts)}),
            )
        )

    def nack(
        self,
        topic: str,
        subscription: str,
        receipts: Receipts,
        *,
        delay_seconds: float | None = None,
        dead_letter: bool = False,
    ) -> NackResult:
        """Make the messages deliverable again after `delay_seconds` (None: the
        subscription's retry backoff), or with `dead_letter` park them now as dead letters
        (whatever the attempt; servers from schema revision 0006 on)."""
        body: dict[str, Any] = {"receipts": _receipts(receipts)}
        if delay_seconds is not None:
            body["delay_seconds"] = delay_seconds
        if dead_letter:
            body["dead_letter"] = True
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "nack"),
                lambda r: NackResult(r.json()["nacked"], r.json()["stale"]),
                body=body,
            )
        )

    def extend(
        self, topic: str, subscription: str, receipts: Receipts, *, ack_deadline_seconds: int
    ) -> ExtendResult:
        """Move the leases' deadline to now + `ack_deadline_seconds`."""
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "extend"),
                lambda r: ExtendResult(r.json()["extended"], r.json()["stale"]),
                body={
                    "receipts": _receipts(receipts),
                    "ack_deadline_seconds": ack_deadline_seconds,
                },
            )
        )

    def seek(
        self,
        topic: str,
        subscription: str,
        *,
        offset: int | None = None,
        time: datetime | str | None = None,
        to: str | None = None,
    ) -> SeekResult:
        """Exactly one of: `offset`, `time` (timezone-aware), `to` ("earliest"/"latest")."""
        body: dict[str, Any] = {}
        if offset is not None:
            body["offset"] = offset
        if time is not None:
            body["time"] = time.isoformat() if isinstance(time, datetime) else time
        if to is not None:
            body["to"] = to
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "seek"),
                lambda r: SeekResult(r.json()["committed_offset"]),
                body=body,
            )
        )

    def dead_letters(
        self, topic: str, subscription: str, *, from_offset: int = 0, limit: int = 100
    ) -> DeadLetterPage:
        return self._run(
            _Request(
                "GET",
                self._sub_path(topic, subscription, "dead-letters"),
                lambda r: DeadLetterPage(
                    [DeadLetterMessage.from_json(m) for m in r.json()["messages"]],
                    r.json()["next_offset"],
                ),
                params={"from_offset": from_offset, "limit": limit},
            )
        )

    def redrive(
        self, topic: str, subscription: str, offsets: Iterable[int] | None = None
    ) -> RedriveResult:
        """Deliver parked messages again: those at `offsets`, or all of them."""
        body: dict[str, Any] = {}
        if offsets is not None:
            body["offsets"] = list(offsets)
        return self._run(
            _Request(
                "POST",
                self._sub_path(topic, subscription, "dead-letters/redrive"),
                lambda r: RedriveResult(r.json()["redriven"]),
                body=body,
            )
        )

    # ---- service --------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when /readyz answers 200."""
        return self._run(_Request("GET", "/readyz", lambda r: True))


# Absolute URLs of the paths a client called, at most this many (a Worker calls a few).
_URL_CACHE_SIZE = 256


def _content(request: _Request) -> bytes | None:
    if isinstance(request.body, _EncodedJSON):
        return request.body.data
    if request.body is not None:
        return json.dumps(request.body, allow_nan=False).encode()
    return None


def _url(
    client: httpx.Client | httpx.AsyncClient, path: str, urls: dict[str, httpx.URL]
) -> httpx.URL:
    # The path joined to the base URL once, not parsed and joined on every request (a
    # Worker pulls from the same path hundreds of times a second).
    url = urls.get(path)
    if url is None:
        if len(urls) >= _URL_CACHE_SIZE:
            urls.clear()
        url = urls[path] = client.base_url.join(path.lstrip("/"))
    return url


_JSON_CONTENT = {"content-type": "application/json"}


def _build(
    client: httpx.Client | httpx.AsyncClient,
    request: _Request,
    timeout: float,
    urls: dict[str, httpx.URL],
) -> httpx.Request:
    content = _content(request)
    headers = _JSON_CONTENT if content is not None else None
    url = _url(client, request.path, urls)
    return client.build_request(
        request.method,
        url,
        params=request.params,
        content=content,
        headers=headers,
        timeout=timeout + request.extra_timeout,
    )


def _aiohttp_client_class() -> type[httpx.AsyncClient] | None:
    """httpx's AsyncClient carrying its requests over aiohttp (httpx-aiohttp, in the
    `aiohttp` and `speed` extras), or None when it is not installed. Proxies from the
    environment and TLS settings are httpx's, as with its own transport."""
    try:
        from httpx_aiohttp import HttpxAiohttpClient
    except ImportError:
        return None
    return HttpxAiohttpClient


def _transport_errors() -> tuple[type[Exception], ...]:
    """What a request can raise when no answer came: httpx's transport errors, and, when
    aiohttp carries requests (it is imported then), the aiohttp errors httpx-aiohttp does
    not map to them (a malformed answer, say). Not imported here: importing aiohttp adds
    ~85 ms to the start of every command of the CLI, which never uses it."""
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is None:
        return (httpx.TransportError,)
    return (httpx.TransportError, aiohttp.ClientError)


class Client(_Operations):
    """Synchronous client. `base_url` and `api_key` default to the environment variables
    SLUICE_URL and SLUICE_API_KEY (sent as `Authorization: Bearer`)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, all_headers = resolve_config(base_url, api_key, headers)
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url, headers=all_headers, timeout=timeout, transport=transport
        )
        self._urls: dict[str, httpx.URL] = {}

    def _run(self, request: _Request) -> Any:
        try:
            response = self._http.send(_build(self._http, request, self.timeout, self._urls))
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        return self._finish(request, response)

    def browse_pages(
        self, topic: str, *, from_offset: int = 0, limit: int = 100
    ) -> Iterator[BrowsePage]:
        """Pages of stored messages from `from_offset` up to the head (ends at an empty page)."""
        while True:
            page = self.browse(topic, from_offset=from_offset, limit=limit)
            if not page.messages:
                return
            yield page
            from_offset = page.next_offset

    def iter_topics(self, *, limit: int = 100) -> Iterator[Topic]:
        after = None
        while True:
            page = self.list_topics(after=after, limit=limit)
            yield from page.items
            if page.next_after is None or not page.items:
                return
            after = page.next_after

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Operations):
    """Asynchronous client: the same methods as `Client`, each to be awaited.

    `transport`: "auto" (the default; None too) carries the requests over aiohttp when
    httpx-aiohttp is installed (the `speed` or `aiohttp` extra), else over httpx's own
    HTTP/1.1 code; "aiohttp" or "httpx" asks for one (aiohttp: about a third less client
    CPU per message in a Worker, bench/RESULTS.md run 26); an `httpx.AsyncBaseTransport` is
    used as it is. Either way the client is httpx's, with its proxies from the environment,
    TLS settings and limits. `transport_name` says which one carries the requests."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | Literal["auto", "aiohttp", "httpx"] | None = "auto",
        max_connections: int = 100,
    ) -> None:
        self.base_url, all_headers = resolve_config(base_url, api_key, headers)
        self.timeout = timeout
        http_class: type[httpx.AsyncClient] = httpx.AsyncClient
        custom: httpx.AsyncBaseTransport | None = None
        if transport is None or transport == "auto":
            http_class = _aiohttp_client_class() or httpx.AsyncClient
        elif transport == "aiohttp":
            aiohttp_class = _aiohttp_client_class()
            if aiohttp_class is None:
                raise ImportError(
                    "transport='aiohttp' needs httpx-aiohttp: pip install 'sluice-client[aiohttp]'"
                )
            http_class = aiohttp_class
        elif isinstance(transport, httpx.AsyncBaseTransport):
            custom = transport
        elif transport != "httpx":
            raise ValueError(
                f"transport: 'auto', 'aiohttp', 'httpx' or a transport, not {transport!r}"
            )
        if custom is not None:
            self.transport_name = "custom"
        else:
            self.transport_name = "httpx" if http_class is httpx.AsyncClient else "aiohttp"
        self._http = http_class(
            base_url=self.base_url,
            headers=all_headers,
            timeout=timeout,
            transport=custom,
            limits=httpx.Limits(max_connections=max_connections),
        )
        self._transport_errors = _transport_errors()
        self._urls: dict[str, httpx.URL] = {}
        # The client's own headers (defaults, user agent, API key, `headers`), merged once,
        # and with the JSON content type for requests with a body.
        self._headers = dict(self._http.headers)
        self._json_headers = {**self._headers, **_JSON_CONTENT}
        # httpx's own choice of transport for a URL (the proxy mounts it built from the
        # environment included); without it (another httpx) every request goes by `send`.
        self._transport_for_url: Callable[[httpx.URL], httpx.AsyncBaseTransport] | None = getattr(
            self._http, "_transport_for_url", None
        )

    async def _run(self, request: _Request) -> Any:
        http = self._http
        try:
            if self._transport_for_url is not None and request.params is None and not http.cookies:
                response = await self._send_direct(request)
            else:
                response = await http.send(_build(http, request, self.timeout, self._urls))
        except self._transport_errors as exc:
            raise connection_error(exc) from exc
        return self._finish(request, response)

    async def _send_direct(self, request: _Request) -> httpx.Response:
        """The request straight to the transport httpx would pick for it, the response read
        whole. `AsyncClient.send`'s layers do nothing for these requests (no auth flow, no
        redirects to follow, no cookies to send, no event hooks) and took about a sixth of
        a Worker's event loop over httpx's own transport (bench/RESULTS.md run 26).
        Cookies a server or a proxy in front of it sets are kept as `send` keeps them;
        once the jar holds one, requests go by `send`, which sends them back."""
        assert self._transport_for_url is not None
        content = _content(request)
        headers = self._headers if content is None else self._json_headers
        url = _url(self._http, request.path, self._urls)
        timeout = self.timeout + request.extra_timeout
        sent = httpx.Request(
            request.method,
            url,
            headers=headers,
            content=content,
            extensions={
                "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
            },
        )
        response = await self._transport_for_url(url).handle_async_request(sent)
        response.request = sent
        try:
            await response.aread()
        finally:
            await response.aclose()
        if "set-cookie" in response.headers:
            self._http.cookies.extract_cookies(response)
        return response

    async def browse_pages(
        self, topic: str, *, from_offset: int = 0, limit: int = 100
    ) -> AsyncIterator[BrowsePage]:
        """Pages of stored messages from `from_offset` up to the head (ends at an empty page)."""
        while True:
            page = await self.browse(topic, from_offset=from_offset, limit=limit)
            if not page.messages:
                return
            yield page
            from_offset = page.next_offset

    async def iter_topics(self, *, limit: int = 100) -> AsyncIterator[Topic]:
        after = None
        while True:
            page = await self.list_topics(after=after, limit=limit)
            for topic in page.items:
                yield topic
            if page.next_after is None or not page.items:
                return
            after = page.next_after

    def publisher(self, topic: str, **options: Any):
        """A batching `Publisher` for `topic` on this client (see Publisher)."""
        from ._publisher import Publisher

        return Publisher(self, topic, **options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
