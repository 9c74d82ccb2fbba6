"""Consuming: long-poll pull with flow control, and ack / nack / extend by receipt.

A waiting pull holds no database connection: it claims (one short transaction), and if
nothing was deliverable it parks in the in-memory WaiterHub until a notification, the
earliest known due time (delay, backoff, lease end), a token of the rate limit, or the
periodic safety re-check, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from sluice.errors import RateLimited, SluiceError
from sluice.queue import receipts
from sluice.queue.context import QueueContext
from sluice.queue.topics import subscription_missing
from sluice.storage import delivery as delivery_sql
from sluice.storage.delivery import ClaimResult, Delivered

# Waking a little after a due time avoids a claim that lands a microsecond too early.
_DUE_SLACK_SECONDS = 0.005


@dataclass(slots=True)
class SettleOutcome:
    applied: int
    stale: list[str]
    lease_until: object | None = None


@dataclass(slots=True)
class PullOutcome:
    messages: list[Delivered]
    rate_headers: dict[str, str] = field(default_factory=dict)
    acked: SettleOutcome | None = None  # the receipts the pull acknowledged first, if any


@contextlib.asynccontextmanager
async def _claim_connection(
    ctx: QueueContext, topic: str, sub: str
) -> AsyncIterator[asyncpg.Connection]:
    """A claim-pool connection, taken after the subscription's claim gate. On the way out
    the gate opens first: returning a connection to the pool is an await (a turn of the
    busy event loop), and the next claim of the subscription need not wait for it (the
    gate's handoff is what serialises a subscription's claims, bench/RESULTS.md)."""
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


async def _claim(
    ctx: QueueContext, topic: str, sub: str, max_messages: int, ack_deadline: int | None
) -> ClaimResult:
    """Lease what is deliverable now (possibly nothing)."""
    async with _claim_connection(ctx, topic, sub) as conn:
        result = await delivery_sql.claim(
            conn, topic, sub, max_messages, ack_deadline, ctx.clock.skew
        )
        if not result.found:
            raise await subscription_missing(conn, topic, sub)
    _count_claim(ctx, topic, sub, result)
    return result


async def _claim_fresh(
    ctx: QueueContext, topic: str, sub: str, max_messages: int, ack_deadline: int | None
) -> ClaimResult | None:
    """Only the one-statement claim of fresh log messages: None when it does not apply to
    the subscription (or to its state now) or leases nothing."""
    async with _claim_connection(ctx, topic, sub) as conn:
        result = await delivery_sql.claim_fresh(
            conn, topic, sub, max_messages, ack_deadline, ctx.clock.skew
        )
    if result is not None:
        _count_claim(ctx, topic, sub, result)
    return result


def _count_claim(ctx: QueueContext, topic: str, sub: str, result: ClaimResult) -> None:
    assert result.topic_id is not None and result.sub_id is not None
    if result.wrote_subscription:
        ctx.subscription_writes += 1
    ctx.rates.record(
        result.topic_id,
        result.sub_id,
        topic,
        sub,
        delivered=len(result.messages),
        expired=result.expired,
        dead_lettered=result.dead_lettered,
    )


def _rate_headers(result: ClaimResult, limit: float | None) -> dict[str, str]:
    if result.tokens is None:
        return {}
    reset = math.ceil(result.token_wait) if result.token_wait else 0
    return {
        "RateLimit-Limit": str(int(limit or 0)),
        "RateLimit-Remaining": str(max(0, math.floor(result.tokens))),
        "RateLimit-Reset": str(reset),
    }


def _delivered(ctx: QueueContext, sub: str, max_messages: int, result: ClaimResult) -> PullOutcome:
    """The answer of a pull whose claim leased messages."""
    if len(result.messages) == max_messages:
        assert result.topic_id is not None
        ctx.hub.wake_next(result.topic_id, sub)  # there may be more for the next waiter
    return PullOutcome(result.messages, _rate_headers(result, result.rate_limit))


async def pull(
    ctx: QueueContext,
    topic: str,
    sub: str,
    max_messages: int,
    wait_seconds: float,
    ack_deadline: int | None,
    ack_first: list[str] | None = None,
) -> PullOutcome:
    """Lease up to `max_messages`, waiting up to `wait_seconds` for some. With `ack_first`,
    those receipts are acknowledged (durably) before anything is claimed: a consumer acks
    its previous batch and asks for the next one in one round trip."""
    if not ack_first:
        outcome = await _pull(ctx, topic, sub, max_messages, wait_seconds, ack_deadline)
        if ack_first is not None:
            outcome.acked = SettleOutcome(0, [])
        return outcome
    # The ack and the one-statement claim of fresh messages run side by side (two
    # connections): that claim applies only to subscriptions without max_in_flight and key
    # ordering, where what an ack frees cannot change what is deliverable. For the others
    # it leases nothing, and the pull below runs after the ack has committed.
    acked, fresh = await asyncio.gather(
        ack(ctx, topic, sub, ack_first),
        _claim_fresh(ctx, topic, sub, max_messages, ack_deadline),
        return_exceptions=True,
    )
    if isinstance(acked, BaseException):
        raise acked
    try:
        if isinstance(fresh, BaseException):
            raise fresh
        if fresh is not None and fresh.messages:
            outcome = _delivered(ctx, sub, max_messages, fresh)
        else:
            outcome = await _pull(ctx, topic, sub, max_messages, wait_seconds, ack_deadline)
    except SluiceError as exc:
        # The acks are committed whatever the pull answers: say so in the problem, so that
        # a client does not retry them and read "stale" as "not acknowledged".
        exc.extra = {"acked": acked.applied, "stale": acked.stale}
        raise
    outcome.acked = acked
    return outcome


async def _pull(
    ctx: QueueContext,
    topic: str,
    sub: str,
    max_messages: int,
    wait_seconds: float,
    ack_deadline: int | None,
) -> PullOutcome:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    hub = ctx.hub
    seen_notifications = hub.notifications
    result = await _claim(ctx, topic, sub, max_messages, ack_deadline)
    topic_id = result.topic_id
    assert topic_id is not None
    waited = False
    async with hub.waiting(topic_id, sub, max_messages) as waiter:
        while True:
            if result.messages:
                return _delivered(ctx, sub, max_messages, result)
            remaining = deadline - loop.time()
            token_wait = result.token_wait
            if token_wait is not None and result.messages_available and token_wait > remaining:
                headers = _rate_headers(result, result.rate_limit)
                headers["Retry-After"] = str(max(1, math.ceil(token_wait)))
                raise RateLimited(
                    f"subscription rate limit reached; retry after {token_wait:.2f}s",
                    headers=headers,
                )
            if remaining <= 0 or hub.closing:
                return PullOutcome([], _rate_headers(result, result.rate_limit))
            # The safety re-check is spread out (jitter) so that many idle long-polls do not
            # all hit the database in the same instant.
            recheck = ctx.settings.poll_recheck_seconds * random.uniform(0.5, 1.0)
            sleep_for = min(remaining, recheck)
            timed = False  # does the sleep end at a known due time or token?
            if result.next_due is not None and result.now is not None:
                until_due = delivery_sql.seconds_between(result.next_due, result.now)
                if max(0.0, until_due) + _DUE_SLACK_SECONDS < sleep_for:
                    sleep_for, timed = max(0.0, until_due) + _DUE_SLACK_SECONDS, True
            if result.token_wait is not None and result.token_wait + _DUE_SLACK_SECONDS < sleep_for:
                sleep_for, timed = result.token_wait + _DUE_SLACK_SECONDS, True
            if waited or hub.notifications == seen_notifications:
                # Nothing was announced since before the last claim: really wait.
                woken = await waiter.wait(sleep_for)
                news = woken or waiter.event.is_set() or hub.closing
                if not news and sleep_for >= remaining:
                    # The wait ran out with no news and nothing due before its end: answer
                    # now rather than queue one more claim behind the pool (1000 long-polls
                    # ending together would otherwise answer seconds late).
                    return PullOutcome([], _rate_headers(result, result.rate_limit))
                if not news and not timed and not hub.take_recheck(topic_id, sub, recheck):
                    # A safety re-check with nothing new: one waiter per subscription and
                    # process does it, the others keep waiting.
                    continue
            waited = True
            waiter.event.clear()
            seen_notifications = hub.notifications
            result = await _claim(ctx, topic, sub, max_messages, ack_deadline)


async def _settle(
    ctx: QueueContext, topic: str, sub: str, receipt_list: list[str], action: str, **kwargs: object
) -> SettleOutcome:
    keys = receipts.decode_all(receipt_list)
    valid = [key for key in keys if key is not None]
    offsets = [offset for offset, _ in valid]
    tokens = [token for _, token in valid]
    async with ctx.pool.acquire() as conn:
        operation = getattr(delivery_sql, action)
        settled = await operation(conn, topic, sub, offsets, tokens, skew=ctx.clock.skew, **kwargs)
        if not settled.found:
            raise await subscription_missing(conn, topic, sub)
        if settled.wake and settled.topic_id is not None:
            await delivery_sql.notify(conn, settled.topic_id, settled.wake)
    if action != "extend" and settled.topic_id is not None and settled.sub_id is not None:
        applied = len(settled.done) - settled.dead_lettered
        ctx.rates.record(
            settled.topic_id,
            settled.sub_id,
            topic,
            sub,
            acked=applied if action == "ack" else 0,
            nacked=applied if action == "nack" else 0,
            dead_lettered=settled.dead_lettered,
        )
    # Which receipt was applied is told by its token: one offset may come with several
    # receipts (an old attempt's and the current one), and only the current one applies.
    done = {
        (offset, token.hex) for offset, token in zip(settled.done, settled.done_tokens, strict=True)
    }
    stale: list[str] = []
    applied = 0
    for receipt, key in zip(receipt_list, keys, strict=True):
        if key is not None and key in done:
            applied += 1
            done.discard(key)  # a receipt given twice is applied once: the repeat is stale
        else:
            stale.append(receipt)
    return SettleOutcome(applied, stale, settled.lease_until)


async def ack(ctx: QueueContext, topic: str, sub: str, receipt_list: list[str]) -> SettleOutcome:
    return await _settle(ctx, topic, sub, receipt_list, "ack")


async def nack(
    ctx: QueueContext, topic: str, sub: str, receipt_list: list[str], delay: float | None
) -> SettleOutcome:
    return await _settle(ctx, topic, sub, receipt_list, "nack", delay_seconds=delay)


async def extend(
    ctx: QueueContext, topic: str, sub: str, receipt_list: list[str], ack_deadline: float
) -> SettleOutcome:
    return await _settle(
        ctx, topic, sub, receipt_list, "extend", ack_deadline_seconds=float(ack_deadline)
    )
