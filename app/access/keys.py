"""API keys: issuing them, and each process's cache of the key table.

A key is `sk_` + 32 random bytes (urlsafe base64); only its SHA-256 is stored (the secret
is high-entropy, so an unsalted hash cannot be brute-forced and lets a request find its
key by hash). Each process caches the unrevoked keys (hash -> scopes) for at most
CACHE_SECONDS, so a key created or revoked with `sluice keys` takes effect everywhere
within a few seconds while the hot path stays one SHA-256 and one dict lookup.

While no key has ever been created the API is open (a warning is logged at start); once
one has been, revoked or not, every /v1 request and /metrics need a key. Revoking every key
leaves the API closed to everyone; only `sluice keys open`, which deletes every key, opens
it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import asyncpg

from sluice.access.scopes import KeyScope, parse_scope
from sluice.storage import keys as keys_sql
from sluice.storage.keys import ActiveKey, ApiKey

log = logging.getLogger("sluice.auth")

# How long a process trusts its copy of the key table. Well under the 10 s promised for
# `sluice keys create/revoke` to reach every process.
CACHE_SECONDS = 2.0
# A refresh that takes longer than this fails the request (503) instead of hanging it.
REFRESH_TIMEOUT_SECONDS = 5.0
SECRET_PREFIX = "sk_"  # noqa: S105 - a prefix, not a secret
# Longer bearer tokens cannot be ours; they are refused before hashing.
MAX_TOKEN_LENGTH = 256


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def issue_key(
    conn: asyncpg.Connection,
    scopes: Iterable[str],
    name: str | None = None,
    sqs_access_key_id: str | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key with these scopes; returns (the key, its secret). The secret exists
    only in the return value: the database keeps its hash. With `sqs_access_key_id` the
    key also signs SQS requests (access.sigv4 derives that secret)."""
    parsed = [parse_scope(s) for s in scopes]
    if not parsed:
        raise ValueError("a key needs at least one scope")
    unique = list(dict.fromkeys(str(s) for s in parsed))
    secret = new_secret()
    key = await keys_sql.create_key(conn, name, hash_secret(secret), unique, sqs_access_key_id)
    return key, secret


@dataclass(frozen=True)
class Principal:
    """The key a request authenticated with (never its secret)."""

    key_id: int
    secret_hash: str
    scopes: tuple[KeyScope, ...]


class Lock(StrEnum):
    """Where the API stands, by the key table."""

    open = "open"  # no key was ever created: anyone may call the API
    keys = "keys"  # active keys exist: each request needs one
    shut = "shut"  # every key is revoked: nobody gets in until a key is created


@dataclass(frozen=True)
class KeySnapshot:
    by_hash: Mapping[str, Principal]  # the active (unrevoked) keys
    any_key: bool  # whether a key was ever created (revoked keys count)
    loaded_at: float  # time.monotonic() when the query started
    # The active keys that sign SQS requests, by access key id.
    by_sqs_access_key: Mapping[str, Principal] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        """The API is open only while no key has ever been created."""
        return not self.any_key

    @property
    def lock(self) -> Lock:
        if self.open:
            return Lock.open
        return Lock.keys if self.by_hash else Lock.shut

    def authenticate(self, token: str) -> Principal | None:
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hash_secret(token)
        principal = self.by_hash.get(digest)
        # The lookup is by a hash the caller cannot steer; the final comparison is constant
        # time anyway, so no branch here depends on how much of a secret was right.
        if principal is None or not hmac.compare_digest(principal.secret_hash, digest):
            return None
        return principal


def _snapshot(keys: Iterable[ActiveKey], any_key: bool, loaded_at: float) -> KeySnapshot:
    by_hash: dict[str, Principal] = {}
    by_sqs: dict[str, Principal] = {}
    for key in keys:
        scopes: list[KeyScope] = []
        for text in key.scopes:
            try:
                scopes.append(parse_scope(text))
            except ValueError:
                log.warning("ignoring an invalid scope of an API key", extra={"key_id": key.id})
        principal = Principal(key.id, key.secret_hash, tuple(scopes))
        by_hash[key.secret_hash] = principal
        if key.sqs_access_key_id:
            by_sqs[key.sqs_access_key_id] = principal
    return KeySnapshot(by_hash, any_key or bool(by_hash), loaded_at, by_sqs)


def log_lock(lock: Lock) -> None:
    """Say where the API stands: at start, and whenever that changes."""
    if lock == Lock.open:
        log.warning(
            "no API keys exist: the API is open to anyone; "
            "create one with `sluice keys create --scope admin`"
        )
    elif lock == Lock.shut:
        log.warning(
            "every API key is revoked: every /v1 request and /metrics are refused (401) "
            "until a key is created with `sluice keys create`"
        )
    else:
        log.info("API keys exist: every /v1 request needs a key")


class KeyCache:
    """The keys of the database, re-read when older than `max_age` seconds.

    One request per expiry pays the (indexed, tiny) queries; the others reuse the snapshot.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_age: float = CACHE_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._max_age = max_age
        self._now = now
        self._lock = asyncio.Lock()
        self._snapshot: KeySnapshot | None = None

    def fresh(self) -> KeySnapshot | None:
        """The keys if they are at most `max_age` old, without waiting (else None: then
        `current()` reads them)."""
        snap = self._snapshot
        if snap is not None and self._now() - snap.loaded_at < self._max_age:
            return snap
        return None

    async def current(self) -> KeySnapshot:
        """The keys, at most `max_age` old. Raises (OSError, TimeoutError, asyncpg errors)
        when they cannot be read: the caller fails closed."""
        snap = self.fresh()
        if snap is not None:
            return snap
        async with self._lock:
            snap = self.fresh()
            if snap is not None:
                return snap
            started = self._now()
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS), self._pool.acquire() as conn:
                active = await keys_sql.active_keys(conn)
                any_key = bool(active) or await keys_sql.any_key_exists(conn)
            snap = _snapshot(active, any_key, started)
            previous, self._snapshot = self._snapshot, snap
            if previous is not None and previous.lock != snap.lock:
                log_lock(snap.lock)
            return snap

    def invalidate(self) -> None:
        """Re-read the keys on the next request."""
        self._snapshot = None
