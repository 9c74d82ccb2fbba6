"""A total-queue checker: every message accounted for, whatever broke meanwhile.

Producers publish messages whose value carries a unique id (`cid`, also the dedup_id, so a
retried publish is not stored twice); consumers pull, "process" for a moment and ack.
Clients retry through connection errors and 5xx answers (the server may be dead, restarting
or without its database). At the end every id is classified:

- lost: answered 201, never acknowledged (must be 0)
- unexpected: delivered but never published by us (must be 0)
- duplicated: delivered more than once (allowed by at-least-once; reported)
- redelivered after ack: delivered by a pull sent after an ack of that id had succeeded
  (must be 0)
- stale accepted: a receipt that could not be current any more was applied (must be 0).
  Probes: acking again a receipt whose ack succeeded (a fraction `double_ack_probe_rate`
  of them); acking the receipt of an earlier attempt once a later attempt of the same
  message was delivered (the earlier lease expired or its pull answer was lost); and, for
  a fraction `overrun_rate` of the pulled batches, a consumer that works past the ack
  deadline and acks only then. Every probe queued is sent (the drain sends what is left);
  one that cannot be sent fails the run like any other request, and with a non-zero
  `double_ack_probe_rate` at least one double-ack probe must have run.

An ack whose answer was lost (connection dropped after the request left, or a 5xx) and whose
retry then said "stale" is *uncertain*: it may have been applied. Such an id counts as
settled only because the drain also waits for the subscription's `lag` to reach 0, i.e. the
service itself says nothing is pending; if it was not applied, the message comes back and
is acked for sure.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx


class GaveUp(AssertionError):
    """A request kept failing past the checker's patience."""


# Kinds of stale-receipt probes.
DOUBLE_ACK = "double_ack"
EARLIER_ATTEMPT = "earlier_attempt"


@dataclass(slots=True)
class Delivery:
    offset: int
    attempt: int
    receipt: str
    pull_sent_at: float


@dataclass
class Figures:
    published: int = 0
    publish_unanswered: int = 0
    delivered: int = 0
    delivered_ids: int = 0
    acked: int = 0
    ack_uncertain: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicated: int = 0
    redelivered_after_ack: int = 0
    stored_twice: int = 0
    late_ack_stale: int = 0
    double_ack_probes: int = 0
    earlier_attempt_probes: int = 0
    stale_probes: int = 0  # both kinds above
    expired_probes: int = 0
    stale_accepted: int = 0
    final_lag: int | None = None
    retried: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    def report(self) -> str:
        head = (
            f"published={self.published} publish_unanswered={self.publish_unanswered} "
            f"delivered={self.delivered} delivered_ids={self.delivered_ids} "
            f"acked={self.acked} ack_uncertain={self.ack_uncertain} | "
            f"lost={self.lost} unexpected={self.unexpected} duplicated={self.duplicated} "
            f"redelivered_after_ack={self.redelivered_after_ack} "
            f"stored_twice={self.stored_twice} late_ack_stale={self.late_ack_stale} "
            f"double_ack_probes={self.double_ack_probes} "
            f"earlier_attempt_probes={self.earlier_attempt_probes} "
            f"expired_probes={self.expired_probes} "
            f"stale_accepted={self.stale_accepted} "
            f"final_lag={self.final_lag}"
        )
        retried = " ".join(f"{k}={v}" for k, v in sorted(self.retried.items()))
        examples = {k: v[:5] for k, v in self.examples.items() if v}
        return f"{head}\n  retried: {retried or 'none'}\n  examples: {examples or 'none'}"


class QueueChecker:
    def __init__(
        self,
        base_url: str | Callable[[], str],
        topic: str,
        sub: str,
        *,
        batch_size: int = 10,
        max_messages: int = 20,
        wait_seconds: float = 1.0,
        publish_pause: float = 0.02,
        process_seconds: tuple[float, float] = (0.0, 0.01),
        double_ack_probe_rate: float = 0.1,
        overrun_rate: float = 0.0,
        patience_seconds: float = 90.0,
        request_timeout: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self._base = base_url
        self.topic = topic
        self.sub = sub
        self.batch_size = batch_size
        self.max_messages = max_messages
        self.wait_seconds = wait_seconds
        self.publish_pause = publish_pause
        self.process_seconds = process_seconds
        self.double_ack_probe_rate = double_ack_probe_rate
        self.overrun_rate = overrun_rate
        self.patience = patience_seconds
        self.rng = random.Random(seed)
        self.client = httpx.AsyncClient(
            timeout=request_timeout,
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )
        self._seq = itertools.count()

        self.attempted: set[str] = set()
        self.published: dict[str, int] = {}
        self.deliveries: dict[str, list[Delivery]] = {}
        self.receipt_ids: dict[str, str] = {}
        self.acked_at: dict[str, float] = {}
        self.uncertain: set[str] = set()
        self.unexpected: list[Any] = []
        self.redelivered_after_ack: list[tuple[str, int, int]] = []
        self.stored_twice: list[tuple[str, list[int]]] = []
        self.late_ack_stale = 0
        # (kind, receipt) still to send; kinds: DOUBLE_ACK, EARLIER_ATTEMPT
        self.probes: list[tuple[str, str]] = []
        self.probes_run: Counter[str] = Counter()
        self.expired_probes = 0
        self.stale_accepted: list[str] = []
        self.retried: Counter[str] = Counter()
        self.requests = 0  # HTTP requests sent (every attempt counts)
        self.final_lag: int | None = None

        self.stop_producing = asyncio.Event()
        self._stop_consuming = asyncio.Event()
        self._producers: list[asyncio.Task[None]] = []
        self._consumers: list[asyncio.Task[None]] = []

    # ---- plumbing ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base() if callable(self._base) else self._base

    @property
    def sub_path(self) -> str:
        return f"/v1/topics/{self.topic}/subscriptions/{self.sub}"

    async def send(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,)
    ) -> tuple[httpx.Response, bool]:
        """Send until an `ok` answer. Returns (response, clean): clean is False when an
        earlier attempt may have reached the server and had an effect."""
        clean = True
        deadline = time.monotonic() + self.patience
        pause = 0.05
        last = ""
        while True:
            self.requests += 1
            try:
                response = await self.client.request(method, self.base_url + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.retried["connect"] += 1  # never reached the server
                last = repr(exc)
            except httpx.TransportError as exc:
                self.retried[type(exc).__name__] += 1
                clean = False
                last = repr(exc)
            else:
                if response.status_code in ok:
                    return response, clean
                if response.status_code < 500:
                    raise AssertionError(
                        f"{method} {path} -> {response.status_code}: {response.text[:500]}"
                    )
                self.retried[f"http{response.status_code}"] += 1
                clean = False
                last = f"{response.status_code} {response.text[:200]}"
            if time.monotonic() > deadline:
                raise GaveUp(f"{method} {path} kept failing for {self.patience}s: {last}")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def setup(self, **sub_config: Any) -> None:
        await self.send("PUT", f"/v1/topics/{self.topic}", {}, ok=(200, 201))
        config = {"start": "earliest", "max_deliveries": 0, **sub_config}
        await self.send("PUT", self.sub_path, config, ok=(200, 201))

    async def lag(self) -> int:
        response, _ = await self.send("GET", self.sub_path)
        return int(response.json()["lag"])

    # ---- producers --------------------------------------------------------------------

    async def producer(self, name: str) -> None:
        while not self.stop_producing.is_set():
            ids = [f"{name}-{next(self._seq)}" for _ in range(self.batch_size)]
            self.attempted.update(ids)
            body = {
                "messages": [
                    {"value": {"cid": cid, "pad": "x" * 64}, "dedup_id": cid} for cid in ids
                ]
            }
            response, _ = await self.send(
                "POST", f"/v1/topics/{self.topic}/messages", body, ok=(201,)
            )
            for cid, stored in zip(ids, response.json()["messages"], strict=True):
                self.published[cid] = stored["offset"]
            await asyncio.sleep(self.publish_pause)

    # ---- consumers --------------------------------------------------------------------

    def _record(self, message: dict[str, Any], pull_sent_at: float) -> str | None:
        value = message.get("value")
        cid = value.get("cid") if isinstance(value, dict) else None
        if not isinstance(cid, str) or cid not in self.attempted:
            self.unexpected.append(message.get("offset"))
            return None
        earlier = self.deliveries.setdefault(cid, [])
        if cid in self.acked_at and pull_sent_at > self.acked_at[cid]:
            self.redelivered_after_ack.append((cid, message["offset"], message["delivery_attempt"]))
        if earlier and earlier[-1].receipt != message["receipt"]:
            # The earlier attempt's lease is over for good: its receipt must be stale now.
            self.probes.append((EARLIER_ATTEMPT, earlier[-1].receipt))
        earlier.append(
            Delivery(
                message["offset"], message["delivery_attempt"], message["receipt"], pull_sent_at
            )
        )
        self.receipt_ids[message["receipt"]] = cid
        return cid

    async def _ack(self, receipts: list[str]) -> None:
        response, clean = await self.send("POST", self.sub_path + "/ack", {"receipts": receipts})
        answered_at = time.monotonic()
        stale = set(response.json()["stale"])
        for receipt in receipts:
            cid = self.receipt_ids[receipt]
            if receipt not in stale:
                self.acked_at.setdefault(cid, answered_at)
                if self.rng.random() < self.double_ack_probe_rate:
                    self.probes.append((DOUBLE_ACK, receipt))
            elif not clean:
                self.uncertain.add(cid)
            else:
                self.late_ack_stale += 1

    async def _probe(self) -> None:
        """Ack receipts that must be stale. A probe that cannot be sent is not skipped: the
        GaveUp fails the consumer, hence the run (a checker that silently stopped probing
        would pass while checking nothing)."""
        if not self.probes:
            return
        batch, self.probes = self.probes[:100], self.probes[100:]
        receipts = [receipt for _, receipt in batch]
        response, _ = await self.send("POST", self.sub_path + "/ack", {"receipts": receipts})
        stale = set(response.json()["stale"])
        self.probes_run.update(kind for kind, _ in batch)
        self.stale_accepted.extend(r for r in receipts if r not in stale)

    async def _overrun(self, messages: list[dict[str, Any]], receipts: list[str]) -> None:
        """Work past the ack deadline, then ack: every receipt must come back stale (the
        messages are redelivered and acked by whoever gets them next)."""
        deadline = max(datetime.fromisoformat(m["ack_deadline"]) for m in messages)
        await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 0.5)
        response, _ = await self.send("POST", self.sub_path + "/ack", {"receipts": receipts})
        answered_at = time.monotonic()
        stale = set(response.json()["stale"])
        self.expired_probes += len(receipts)
        for receipt in receipts:
            if receipt not in stale:
                self.stale_accepted.append(receipt)
                self.acked_at.setdefault(self.receipt_ids[receipt], answered_at)

    async def consumer(self) -> None:
        body = {"max_messages": self.max_messages, "wait_seconds": self.wait_seconds}
        while not self._stop_consuming.is_set():
            sent_at = time.monotonic()
            response, _ = await self.send("POST", self.sub_path + "/pull", body)
            messages = response.json()["messages"]
            mine = [m for m in messages if self._record(m, sent_at) is not None]
            receipts = [m["receipt"] for m in mine]
            if receipts and self.rng.random() < self.overrun_rate:
                await self._overrun(mine, receipts)
            elif receipts:
                await asyncio.sleep(self.rng.uniform(*self.process_seconds))
                await self._ack(receipts)
            await self._probe()

    # ---- running ----------------------------------------------------------------------

    def start(self, producers: int, consumers: int) -> None:
        self._producers += [asyncio.create_task(self.producer(f"p{i}")) for i in range(producers)]
        self._consumers += [asyncio.create_task(self.consumer()) for _ in range(consumers)]

    def _check_tasks(self) -> None:
        for task in self._producers + self._consumers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def wait_progress(self, published: int = 0, acked: int = 0, timeout: float = 60) -> None:
        """Wait until at least this many more ids are published and acked than now."""
        want_published = len(self.published) + published
        want_acked = len(self.acked_at) + acked
        deadline = time.monotonic() + timeout
        while len(self.published) < want_published or len(self.acked_at) < want_acked:
            self._check_tasks()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no progress in {timeout}s: published {len(self.published)}/"
                    f"{want_published}, acked {len(self.acked_at)}/{want_acked}\n"
                    + self.figures().report()
                )
            await asyncio.sleep(0.05)

    async def stop_producers(self) -> None:
        self.stop_producing.set()
        await asyncio.gather(*self._producers)

    def _settled(self) -> bool:
        return all(cid in self.acked_at or cid in self.uncertain for cid in self.published)

    async def drain(self, timeout: float = 90.0, quiet_seconds: float = 3.0) -> Figures:
        """Consume until every published id is settled and the service reports lag 0, then
        keep pulling for quiet_seconds (longer than an ack deadline plus backoff) so an ack
        that did not stick would show up as a redelivery."""
        if not self.stop_producing.is_set():
            await self.stop_producers()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._check_tasks()
                if self._settled() and await self.lag() == 0:
                    await asyncio.sleep(quiet_seconds)
                    break
                await asyncio.sleep(0.25)
        finally:
            self._stop_consuming.set()
            results = await asyncio.gather(*self._consumers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        while self.probes:  # queued by the last rounds of the consumers
            await self._probe()
        self.final_lag = await self.lag()
        return self.figures()

    async def aclose(self) -> None:
        self.stop_producing.set()
        self._stop_consuming.set()
        for task in self._producers + self._consumers:
            task.cancel()
        await asyncio.gather(*self._producers, *self._consumers, return_exceptions=True)
        await self.client.aclose()

    # ---- verdict ----------------------------------------------------------------------

    def figures(self) -> Figures:
        lost = [c for c in self.published if c not in self.acked_at and c not in self.uncertain]
        duplicated = [c for c, ds in self.deliveries.items() if len(ds) > 1]
        stored_twice = [
            (c, sorted({d.offset for d in ds}))
            for c, ds in self.deliveries.items()
            if len({d.offset for d in ds}) > 1
        ]
        uncertain = [c for c in self.uncertain if c not in self.acked_at]
        return Figures(
            published=len(self.published),
            publish_unanswered=len(self.attempted - self.published.keys()),
            delivered=sum(len(ds) for ds in self.deliveries.values()),
            delivered_ids=len(self.deliveries),
            acked=len(self.acked_at),
            ack_uncertain=len(uncertain),
            lost=len(lost),
            unexpected=len(self.unexpected),
            duplicated=len(duplicated),
            redelivered_after_ack=len(self.redelivered_after_ack),
            stored_twice=len(stored_twice),
            late_ack_stale=self.late_ack_stale,
            double_ack_probes=self.probes_run[DOUBLE_ACK],
            earlier_attempt_probes=self.probes_run[EARLIER_ATTEMPT],
            stale_probes=sum(self.probes_run.values()),
            expired_probes=self.expired_probes,
            stale_accepted=len(self.stale_accepted),
            final_lag=self.final_lag,
            retried=dict(self.retried),
            examples={
                "lost": sorted(lost)[:5],
                "unexpected": self.unexpected[:5],
                "redelivered_after_ack": self.redelivered_after_ack[:5],
                "stale_accepted": self.stale_accepted[:5],
                "duplicated": [
                    (c, [(d.offset, d.attempt) for d in self.deliveries[c]]) for c in duplicated[:3]
                ],
            },
        )

    def assert_sound(self, label: str) -> Figures:
        """Print the figures and assert the guarantees of SPEC 1 and 3.3."""
        figures = self.figures()
        report = f"[{label}] {figures.report()}"
        print("\n" + report)
        assert figures.published > 0, report
        assert figures.lost == 0, report
        assert figures.unexpected == 0, report
        assert figures.redelivered_after_ack == 0, report
        assert figures.stale_accepted == 0, report
        assert figures.final_lag == 0, report
        # The double-ack probe ran (it is random: a rate of 0.02 over hundreds of acks).
        if self.double_ack_probe_rate > 0:
            assert figures.double_ack_probes > 0, report
        assert not self.probes, report  # every probe queued was sent
        return figures
