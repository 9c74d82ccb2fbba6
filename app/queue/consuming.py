"""Consuming: long-poll pull with flow control, and ack / nack / extend by receipt.

A waiting pull holds no database connection: it claims (one short transaction), and if
nothing was deliverable it parks in the in-memory WaiterHub until a notification, the
earliest known due time (delay, backoff, deadline), a token of the rate limit, or the
periodic safety re-check, whichever comes first. A pull whose client has gone away stops
waiting, and gives back at once whatever it had already claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import asyncpg

from sluice.errors import RateLimited, SluiceError
from sluice.queue import receipts
from sluice.queue.context import QueueContext
from sluice.queue.topics import subscription_missing
from sluice.records import Claim, Delivery, EventKind, Receipt, Settled, Settlement
from sluice.storage import claims as claims_sql
from sluice.storage import settlement as settlement_sql

# Waking a little after a due time avoids a claim that lands a microsecond too early.
_DUE_SLACK_SECONDS = 0.005
# How far a claim reads the log past messages that cannot go out now (delayed, or behind
# a busy key) before it gives up for this call.
SCAN_LIMIT = 2000


class ClientWatch(Protocol):
    """The client of a long-poll, as the HTTP layer sees it (app.api.disconnect)."""

    def start(self) -> asyncio.Event:
        """Listen from now on; the event is set when the client disconnects."""
        ...

    async def gone(self) -> bool:
        """Whether the client has disconnected by now, without waiting."""
        ...


@dataclass(frozen=True, slots=True)
class PullParams:
    """What a pull asks for; the subscription's own ack deadline when none is given."""

    topic: str
    subscription: str
    max_messages: int
    wait_seconds: float = 0.0
    ack_deadline_seconds: int | None = None


@dataclass(slots=True)
class SettleOutcome:
    applied: int
    stale: list[str]
    lease_until: datetime | None = None


@dataclass(slots=True)
class PullOutcome:
    messages: list[Delivery]
    rate_headers: dict[str, str] = field(default_factory=dict)
    acked: SettleOutcome | None = None  # the receipts the pull acknowledged first, if any


def receipt_of(message: Delivery) -> str:
    return receipts.encode(message.offset, message.lease_id, message.seg, message.token)


def receipts_of(messages: list[Delivery]) -> list[str]:
    """receipt_of() of each message, in order (a pull's answer: one base64 encode)."""
    return receipts.encode_all(messages)


@contextlib.asynccontextmanager
async def _claim_connection(
    ctx: QueueContext, topic: str, sub: str
) -> AsyncIterator[asyncpg.Connection]:
    """A claim-pool connection, taken after the subscription's claim gate. On the way out
    the gate opens first: returning a connection to the pool is an await (a turn of the
    busy event loop), and the next claim of the subscription need not wait for it."""
    gate = ctx.claim_gate(topic, sub)
    await gate.acquire()
    try:
        conn = await ctx.claim_pool.acquire()
    except BaseException:
        gate.release()
        raise
    try:
        yield conn
    finally:
        gate.release()
        await ctx.claim_pool.release(conn)


async def claim(ctx: QueueContext, params: PullParams) -> Claim:
    """Lease what is deliverable now (possibly nothing); max_messages = 0 only lets
    deadlines pass (expired leases retry or park). Concurrent pulls of a subscription share
    claims (app.queue.claim_groups)."""
    topic, sub, deadline = params.topic, params.subscription, params.ack_deadline_seconds
    if params.max_messages == 0:
        return await _claim(ctx, topic, sub, 0, deadline)
    return await ctx.claim_groups.claim(
        topic,
        sub,
        params.max_messages,
        deadline,
        lambda count: _claim(ctx, topic, sub, count, deadline),
        lambda messages: give_back(ctx, topic, sub, messages),
    )


async def _claim(
    ctx: QueueContext, topic: str, sub: str, max_messages: int, deadline: int | None
) -> Claim:
    """One claim in the database; its deliveries, expiries and dead letters are counted."""
    async with _claim_connection(ctx, topic, sub) as conn:
        result = await claims_sql.claim(
            conn, topic, sub, max_messages, deadline, ctx.clock.skew, SCAN_LIMIT
        )
        if not result.found:
            raise await subscription_missing(conn, topic, sub)
    assert result.topic_id is not None and result.sub_id is not None
    ctx.rates.record(
        result.topic_id,
        result.sub_id,
        topic,
        sub,
        **{
            EventKind.DELIVERED: len(result.messages),
            EventKind.EXPIRED: result.expired,
            EventKind.DEAD_LETTERED: result.dead_lettered,
        },
    )
    return result


def _rate_headers(result: Claim) -> dict[str, str]:
    if result.tokens is None:
        return {}
    reset = math.ceil(result.token_wait) if result.token_wait else 0
    return {
        # The bucket's capacity: Remaining counts the same unit and never exceeds it (the
        # rate itself could be below 1/s, which an integer header cannot say).
        "RateLimit-Limit": str(int(result.burst or 0)),
        "RateLimit-Remaining": str(max(0, math.floor(result.tokens))),
        "RateLimit-Reset": str(reset),
    }


def _seconds_between(later: datetime, earlier: datetime) -> float:
    return (later - earlier) / timedelta(seconds=1)


async def pull(
    ctx: QueueContext,
    params: PullParams,
    ack_first: list[str] | None = None,
    client_gone: ClientWatch | None = None,
) -> PullOutcome:
    """Lease up to `max_messages`, waiting up to `wait_seconds` for some. With `ack_first`,
    those receipts are acknowledged (durably) before anything is claimed: a consumer acks
    its previous batch and asks for the next one in one round trip. `client_gone` watches
    the client of a long-poll: when it has gone away by the time messages are claimed, they
    are given back at once (instead of leased to nobody until the ack deadline), and a
    waiting pull stops waiting."""
    acked = None
    if ack_first is not None:
        acked = (
            await ack(ctx, params.topic, params.subscription, ack_first)
            if ack_first
            else SettleOutcome(0, [])
        )
    try:
        outcome = await _pull(ctx, params, client_gone)
    except SluiceError as exc:
        if acked is not None:
            # The acks are committed whatever the pull answers: say so in the problem, so a
            # client does not retry them and read "stale" as "not acknowledged".
            exc.extra = {"acked": acked.applied, "stale": acked.stale}
        raise
    outcome.acked = acked
    return outcome


async def _pull(ctx: QueueContext, params: PullParams, watch: ClientWatch | None) -> PullOutcome:
    topic, sub, max_messages = params.topic, params.subscription, params.max_messages
    loop = asyncio.get_running_loop()
    wait_ends = loop.time() + params.wait_seconds
    hub = ctx.hub
    seen_notifications = hub.notifications
    result = await claim(ctx, params)
    topic_id = result.topic_id
    assert topic_id is not None
    if params.wait_seconds <= 0:
        watch = None  # a short pull's client gets its answer in the same instant
    if result.messages:
        # Answered at once: no waiter to register, no listener to start; one look whether
        # the client left while the claim ran (a worker stopping cancels its long-polls).
        if watch is not None and await watch.gone():
            await give_back(ctx, topic, sub, result.messages)
            return PullOutcome([])
        if len(result.messages) == max_messages:
            hub.wake_next(topic_id, sub)  # there may be more for the next waiter
        return PullOutcome(result.messages, _rate_headers(result))
    client_gone = watch.start() if watch is not None else None
    waited = False
    async with hub.waiting(topic_id, sub, max_messages, client_gone) as waiter:
        while True:
            if result.messages:
                if client_gone is not None and client_gone.is_set():
                    await give_back(ctx, topic, sub, result.messages)
                    return PullOutcome([])
                if len(result.messages) == max_messages:
                    hub.wake_next(topic_id, sub)  # there may be more for the next waiter
                return PullOutcome(result.messages, _rate_headers(result))
            remaining = wait_ends - loop.time()
            token_wait = result.token_wait
            if token_wait is not None and result.messages_available and token_wait > remaining:
                headers = _rate_headers(result)
                headers["Retry-After"] = str(max(1, math.ceil(token_wait)))
                raise RateLimited(
                    f"subscription rate limit reached; retry after {token_wait:.2f}s",
                    headers=headers,
                )
            gone = client_gone is not None and client_gone.is_set()
            if remaining <= 0 or hub.closing or gone:
                return PullOutcome([], _rate_headers(result))
            # The safety re-check is spread out (jitter) so that many idle long-polls do not
            # all hit the database in the same instant.
            recheck = ctx.settings.poll_recheck_seconds * random.uniform(0.5, 1.0)
            sleep_for = min(remaining, recheck)
            timed = False  # does the sleep end at a known due time or token?
            if result.next_due is not None and result.now is not None:
                until_due = max(0.0, _seconds_between(result.next_due, result.now))
                if until_due + _DUE_SLACK_SECONDS < sleep_for:
                    sleep_for, timed = until_due + _DUE_SLACK_SECONDS, True
            if token_wait is not None and token_wait + _DUE_SLACK_SECONDS < sleep_for:
                sleep_for, timed = token_wait + _DUE_SLACK_SECONDS, True
            if waited or hub.notifications == seen_notifications:
                # Nothing was announced since before the last claim: really wait.
                woken = await waiter.wait(sleep_for)
                if client_gone is not None and client_gone.is_set():
                    return PullOutcome([])
                news = woken or waiter.event.is_set() or hub.closing
                if not news and sleep_for >= remaining:
                    # The wait ran out with no news and nothing due before its end: answer
                    # now rather than queue one more claim behind the pool (1000 long-polls
                    # ending together would otherwise answer seconds late).
                    return PullOutcome([], _rate_headers(result))
                if not news and not timed and not hub.take_recheck(topic_id, sub, recheck):
                    # A safety re-check with nothing new: one waiter per subscription and
                    # process does it, the others keep waiting.
                    continue
            waited = True
            waiter.event.clear()
            seen_notifications = hub.notifications
            result = await claim(ctx, params)


async def _settle(
    ctx: QueueContext,
    topic: str,
    sub: str,
    receipt_list: list[str],
    kind: Settlement,
    seconds: float | None = None,
) -> SettleOutcome:
    decoded = receipts.decode_all(receipt_list)
    valid = [receipt for receipt in decoded if receipt is not None]

    async def write(given: list[Receipt]) -> Settled:
        async with ctx.pool.acquire() as conn:
            settled = await settlement_sql.settle(
                conn, kind, topic, sub, given, seconds, ctx.clock.skew
            )
            if not settled.found:
                raise await subscription_missing(conn, topic, sub)
        return settled

    # Concurrent requests of one kind (and delay or deadline) share a write.
    settled = await ctx.settle_groups.settle(topic, sub, valid, write, kind, seconds)
    assert settled.topic_id is not None and settled.sub_id is not None
    # What applied is a set of distinct receipts given: as many as were given means every
    # receipt was a distinct one and applied, and none is stale. Otherwise, one offset may
    # come with several receipts (an old attempt's and the current one): only the current
    # one applied, and a receipt given twice applies once.
    stale: list[str] = []
    applied = len(settled.applied)
    if applied < len(receipt_list):
        done = set(settled.applied)
        applied = 0
        for text, receipt in zip(receipt_list, decoded, strict=True):
            if receipt is not None and receipt.key in done:
                applied += 1
                done.discard(receipt.key)
            else:
                stale.append(text)
    if kind in (Settlement.ACK, Settlement.NACK, Settlement.DEAD_LETTER):
        ctx.rates.record(
            settled.topic_id,
            settled.sub_id,
            topic,
            sub,
            **{
                EventKind.ACKED if kind is Settlement.ACK else EventKind.NACKED: applied
                - settled.dead_lettered,
                EventKind.DEAD_LETTERED: settled.dead_lettered,
            },
        )
    return SettleOutcome(applied, stale, settled.lease_until)


async def ack(ctx: QueueContext, topic: str, sub: str, receipt_list: list[str]) -> SettleOutcome:
    return await _settle(ctx, topic, sub, receipt_list, Settlement.ACK)


async def nack(
    ctx: QueueContext,
    topic: str,
    sub: str,
    receipt_list: list[str],
    delay: float | None,
    dead_letter: bool = False,
) -> SettleOutcome:
    """Deliverable again after `delay` (None: the backoff); with `dead_letter`, parked now
    as a dead letter instead, whatever the attempt and max_deliveries."""
    if dead_letter:
        return await _settle(ctx, topic, sub, receipt_list, Settlement.DEAD_LETTER)
    return await _settle(ctx, topic, sub, receipt_list, Settlement.NACK, delay)


async def extend(
    ctx: QueueContext,
    topic: str,
    sub: str,
    receipt_list: list[str],
    ack_deadline_seconds: float,
) -> SettleOutcome:
    """The new deadline is now + ack_deadline_seconds."""
    return await _settle(
        ctx, topic, sub, receipt_list, Settlement.EXTEND, float(ack_deadline_seconds)
    )


async def give_back(ctx: QueueContext, topic: str, sub: str, messages: list[Delivery]) -> None:
    """Leases whose client went away before it could see them: deliverable again at once,
    the attempt not counted."""
    with contextlib.suppress(SluiceError):
        await _settle(ctx, topic, sub, receipts_of(messages), Settlement.GIVE_BACK)
