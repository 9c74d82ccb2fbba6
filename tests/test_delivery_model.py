"""The delivery state machine against a simple in-memory model (Hypothesis stateful test).

Each example gets a fresh topic with one subscription (start earliest, no retry backoff,
unlimited deliveries), then runs a random sequence of publish / pull / ack / nack /
extend / advance-the-clock / seek through the HTTP API, checking after every step that:
- a receipt is applied iff it is the current lease's receipt and the lease has not ended;
- no message is leased twice at once, and a pull takes what is due first, then the log
  in offset order (fresh offsets strictly increase until a seek);
- an acked message is never delivered again unless a seek moved before it;
- the stats (backlog, in_flight, delayed, lag, committed_offset, head_offset,
  dead_lettered) are what the model says.

Time only moves through the injectable clock. Leases last ACK_DEADLINE seconds of clock;
advances never stop within MARGIN seconds before a lease's end, so the real time a step
takes can never decide whether a lease ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sluice.main import create_app
from sluice.queue.clock import Clock
from sluice.queue.receipts import decode, encode
from tests.conftest import create_database, make_settings

ACK_DEADLINE = 600
MARGIN = 300  # far more than any example takes in real time

# What the runs went through, so the test fails if the examples stop reaching the cases
# that matter (stale receipts, leases ending, redeliveries, seeks).
SEEN: Counter[str] = Counter()


@dataclass
class Lease:
    receipt: str
    until: float  # clock skew at which the lease ends


@dataclass
class Pending:
    """A message the subscription took from the log and has not acked."""

    attempts: int
    lease: Lease | None  # None: due now (nacked, or its lease ended)


class Service:
    """The app in-process on an event loop of its own (an anyio blocking portal): the
    lifespan (pool, listener) runs there, and the synchronous state machine sends each
    request through it."""

    def __init__(self, url: str) -> None:
        self.clock = Clock()
        self.app = create_app(make_settings(url), clock=self.clock)
        self._stack = ExitStack()

    def __enter__(self) -> Service:
        self.portal = self._stack.enter_context(start_blocking_portal())
        lifespan = self.app.router.lifespan_context(self.app)
        self.portal.call(lifespan.__aenter__)
        self._stack.callback(self.portal.call, lifespan.__aexit__, None, None, None)
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://sluice.test")
        self._stack.callback(self.portal.call, self.client.aclose)
        return self

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.portal.call(partial(self.client.request, method, path, json=body))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _run_sync(coro: Any) -> Any:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="module")
def service(pg_server: str) -> Iterator[Service]:
    url = _run_sync(create_database(pg_server, f"model_{uuid.uuid4().hex[:10]}"))
    with Service(url) as svc:
        yield svc


class DeliveryModel(RuleBasedStateMachine):
    service: Service

    def __init__(self) -> None:
        super().__init__()
        self.clock = self.service.clock
        self.topic = f"m-{uuid.uuid4().hex[:12]}"
        self.base = f"/v1/topics/{self.topic}/subscriptions/s"
        self.log: list[int] = []  # published offsets, in order
        self.cursor = 0  # next offset to take from the log
        self.pending: dict[int, Pending] = {}
        self.acked: set[int] = set()  # acked, and no seek has moved back before them
        self.receipts: list[str] = []  # every receipt ever handed out
        self.last_fresh = -1
        self.created = False

    # ---- helpers ------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self.service.request(method, path, body)
        assert r.status_code == expect, (method, path, body, r.status_code, r.text)
        return r.json() if r.content else None

    @property
    def now(self) -> float:
        return self.clock.skew

    def live(self, pending: Pending) -> bool:
        return pending.lease is not None and self.now < pending.lease.until

    def due(self) -> set[int]:
        return {o for o, p in self.pending.items() if not self.live(p)}

    def current_receipts(self) -> dict[str, int]:
        return {p.lease.receipt: o for o, p in self.pending.items() if p.lease and self.live(p)}

    def log_end(self) -> int:
        """The topic's next offset (offsets start at 0)."""
        return self.log[-1] + 1 if self.log else 0

    def settle(self, action: str, receipts: list[str], **extra: Any) -> tuple[set[int], list]:
        """What ack/nack/extend must apply: (offsets applied, stale receipts)."""
        current = self.current_receipts()
        applied: set[int] = set()
        stale: list[str] = []
        for receipt in receipts:
            offset = current.get(receipt)
            if offset is None or offset in applied:
                stale.append(receipt)
            else:
                applied.add(offset)
        result = self.call("POST", f"{self.base}/{action}", {"receipts": receipts, **extra})
        count = {"ack": "acked", "nack": "nacked", "extend": "extended"}[action]
        assert result[count] == len(applied), (action, result, applied)
        assert sorted(result["stale"]) == sorted(stale), (action, result, stale)
        SEEN[f"{action}: {'applied' if applied else 'nothing applied'}"] += 1
        if stale and applied:
            SEEN[f"{action}: applied and stale in one request"] += 1
        return applied, stale

    # ---- rules --------------------------------------------------------------------------

    @initialize()
    def create(self) -> None:
        self.call("PUT", f"/v1/topics/{self.topic}", {}, expect=201)
        config = {
            "ack_deadline_seconds": ACK_DEADLINE,
            "retry_min_seconds": 0,
            "retry_max_seconds": 0,
            "max_deliveries": 0,
            "start": "earliest",
        }
        self.call("PUT", self.base, config, expect=201)
        self.created = True

    @rule(count=st.integers(1, 5))
    def publish(self, count: int) -> None:
        body = {"messages": [{"value": len(self.log) + i} for i in range(count)]}
        result = self.call("POST", f"/v1/topics/{self.topic}/messages", body, expect=201)
        offsets = [m["offset"] for m in result["messages"]]
        assert not any(m["duplicate"] for m in result["messages"])
        assert offsets == sorted(offsets) and len(set(offsets)) == count
        assert not self.log or offsets[0] > self.log[-1]
        self.log.extend(offsets)

    @rule(max_messages=st.integers(1, 6))
    def pull(self, max_messages: int) -> None:
        due = self.due()
        body = {"max_messages": max_messages, "wait_seconds": 0}
        messages = self.call("POST", f"{self.base}/pull", body)["messages"]
        offsets = [m["offset"] for m in messages]
        assert len(set(offsets)) == len(offsets), f"one message leased twice: {offsets}"
        redelivered = [o for o in offsets if o in self.pending]
        fresh = [o for o in offsets if o not in self.pending]
        for offset in redelivered:
            assert offset in due, f"offset {offset} delivered while its lease is live"
        assert len(redelivered) == min(max_messages, len(due)), (redelivered, due)
        available = [o for o in self.log if o >= self.cursor]
        expected_fresh = available[: max_messages - len(redelivered)]
        assert fresh == expected_fresh, (fresh, expected_fresh, self.cursor)
        assert all(o not in self.acked for o in offsets), "an acked message came back"
        assert all(o > self.last_fresh for o in fresh), "fresh offsets went backwards"
        for m in messages:
            offset = m["offset"]
            previous = self.pending.get(offset)
            attempts = previous.attempts + 1 if previous else 1
            assert m["delivery_attempt"] == attempts, (m, attempts)
            assert m["value"] == self.log.index(offset), m
            self.pending[offset] = Pending(attempts, Lease(m["receipt"], self.now + ACK_DEADLINE))
            self.receipts.append(m["receipt"])
        SEEN[f"pull: {'redelivered' if redelivered else 'no redelivery'}"] += 1
        if fresh:
            self.cursor = fresh[-1] + 1
            self.last_fresh = fresh[-1]

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        receipts = self.pick_receipts(data)
        applied, _ = self.settle("ack", receipts)
        for offset in applied:
            del self.pending[offset]
            self.acked.add(offset)

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        receipts = self.pick_receipts(data)
        applied, _ = self.settle("nack", receipts, delay_seconds=0)
        for offset in applied:
            self.pending[offset].lease = None

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        receipts = self.pick_receipts(data)
        applied, _ = self.settle("extend", receipts, ack_deadline_seconds=ACK_DEADLINE)
        for offset in applied:
            lease = self.pending[offset].lease
            assert lease is not None
            lease.until = self.now + ACK_DEADLINE

    def pick_receipts(self, data: st.DataObject) -> list[str]:
        current = list(self.current_receipts())
        choices = st.sampled_from(self.receipts)
        if current:
            choices = st.one_of(st.sampled_from(current), choices)
        # A real offset with a lease and segment taken from a real receipt (or none), and a
        # token nobody issued.
        real = [decode(r) for r in self.receipts]
        leases = sorted({(r.lease_id, r.seg) for r in real if r is not None}) or [(1, 1)]
        forged = st.builds(
            lambda o, lease: encode(o, lease[0], lease[1], uuid.uuid4()),
            st.sampled_from(self.log) if self.log else st.just(0),
            st.sampled_from(leases),
        )
        junk = st.sampled_from(["", "not-a-receipt", "A" * 32, "A" * 48])
        picked = st.one_of(choices, choices, forged, junk)
        return data.draw(st.lists(picked, min_size=1, max_size=4), label="receipts")

    @precondition(lambda self: self.current_receipts())
    @rule(seconds=st.sampled_from([1, 100, ACK_DEADLINE // 2, ACK_DEADLINE, 2 * ACK_DEADLINE]))
    def advance(self, seconds: float) -> None:
        """Move the clock, but never to just before a lease's end (see module doc)."""
        target = self.now + seconds
        while True:
            close = [
                p.lease.until
                for p in self.pending.values()
                if p.lease and p.lease.until - MARGIN < target < p.lease.until
            ]
            if not close:
                break
            target = max(close)
        ended = sum(1 for p in self.pending.values() if self.live(p) and p.lease.until <= target)
        SEEN[f"advance: {'leases ended' if ended else 'no lease ended'}"] += 1
        self.clock.advance(target - self.now)

    @precondition(lambda self: self.log)
    @rule(where=st.sampled_from(["earliest", "latest", "offset"]), data=st.data())
    def seek(self, where: str, data: st.DataObject) -> None:
        if where == "offset":
            offset = data.draw(st.integers(0, self.log_end() + 2), label="offset")
            body: dict[str, Any] = {"offset": offset}
            # Clamped to the log: past the head seeks to the head, below the oldest
            # retained message to the oldest.
            target = max(min(offset, self.log_end()), self.log[0])
        else:
            body = {"to": where}
            target = self.log[0] if where == "earliest" else self.log_end()
        SEEN["seek: leases dropped" if self.current_receipts() else "seek"] += 1
        result = self.call("POST", f"{self.base}/seek", body)
        assert result["committed_offset"] == target, (result, target)
        # Every lease is dropped: from the target on everything is pending again, before it
        # everything counts as acknowledged.
        self.pending.clear()
        self.acked = {o for o in self.acked if o < target}
        self.cursor = target
        self.last_fresh = target - 1

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def stats_match(self) -> None:
        if not self.created:
            return
        stats = self.call("GET", self.base)
        in_flight = sum(1 for p in self.pending.values() if self.live(p))
        in_log = len([o for o in self.log if o >= self.cursor])
        backlog = len(self.due()) + in_log
        committed = min([*self.pending, self.cursor])
        expected = {
            "backlog": backlog,
            "in_flight": in_flight,
            "delayed": 0,
            "dead_lettered": 0,
            "lag": backlog + in_flight,
            "committed_offset": committed,
            "head_offset": self.log[-1] if self.log else None,
        }
        actual = {k: stats[k] for k in expected}
        assert actual == expected, (actual, expected)


@pytest.mark.timeout(600)
def test_delivery_state_machine_matches_model(service: Service) -> None:
    DeliveryModel.service = service
    SEEN.clear()
    run_state_machine_as_test(
        DeliveryModel,
        settings=settings(
            max_examples=40,
            stateful_step_count=35,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    reached = {
        "ack: applied",
        "ack: applied and stale in one request",
        "nack: applied",
        "nack: nothing applied",
        "extend: applied",
        "pull: redelivered",
        "advance: leases ended",
        "seek: leases dropped",
    }
    assert reached <= set(SEEN), f"not reached: {reached - set(SEEN)} (seen: {dict(SEEN)})"
