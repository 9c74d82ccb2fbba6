"""`sluice keys create | list | revoke | open`: manage API keys. Never prompts (scriptable).

`create` prints the secret, alone, on stdout (so `KEY=$(sluice keys create ...)` works)
and everything else on stderr; the secret is shown only then, the database keeps its hash.
Revoking every key leaves the API closed; `open --yes-i-mean-it` deletes every key, the one
way to make the API open to anyone again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from sluice.access.keys import issue_key
from sluice.access.scopes import parse_scope
from sluice.access.sigv4 import derive_secret, new_access_key_id
from sluice.embedded import command_database
from sluice.logs import configure_logging
from sluice.settings import get_settings
from sluice.storage import keys as keys_sql
from sluice.storage import migrate
from sluice.storage.db import plain_url
from sluice.storage.keys import ApiKey

log = logging.getLogger("sluice.keys")

T = TypeVar("T")
MAX_NAME_LENGTH = 200


def _run(job: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Bring the schema to head, then run `job` on one connection."""
    configure_logging(get_settings().log_level)

    async def main(url: str) -> T:
        await migrate.upgrade(url)
        conn = await asyncpg.connect(plain_url(url))
        try:
            return await job(conn)
        finally:
            await conn.close()

    with command_database() as database:
        return asyncio.run(main(database.url))


def _describe(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "scopes": list(key.scopes),
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def cmd_create(args: argparse.Namespace) -> int:
    try:
        for text in args.scopes:
            parse_scope(text)
    except ValueError as exc:
        print(f"sluice keys create: {exc}", file=sys.stderr)
        return 2
    if args.name is not None and not 1 <= len(args.name) <= MAX_NAME_LENGTH:
        print(
            f"sluice keys create: --name must be 1..{MAX_NAME_LENGTH} characters", file=sys.stderr
        )
        return 2
    access_key_id = None
    if args.sqs:
        server_secret = get_settings().sqs_secret
        if not server_secret:
            print(
                "sluice keys create: --sqs needs SLUICE_SQS_SECRET (the server secret SQS "
                "secrets are derived from; the servers need the same value)",
                file=sys.stderr,
            )
            return 2
        access_key_id = new_access_key_id()
    key, secret = _run(lambda conn: issue_key(conn, args.scopes, args.name, access_key_id))
    if access_key_id is None:
        print(secret, flush=True)
    else:
        assert server_secret
        # Shell assignments (values are base64url / base32: nothing to quote), so that
        # `eval "$(sluice keys create ... --sqs)"` sets up boto3 and the AWS CLI.
        print(
            f"SLUICE_API_KEY={secret}\n"
            f"AWS_ACCESS_KEY_ID={access_key_id}\n"
            f"AWS_SECRET_ACCESS_KEY={derive_secret(server_secret, access_key_id)}",
            flush=True,
        )
    print(
        f"created key {key.id} with scopes {' '.join(key.scopes)}; "
        "store the secret now: it is not shown again",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [_describe(r) for r in _run(keys_sql.list_keys)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':>6}  {'NAME':<20}  {'CREATED':<25}  {'STATUS':<33}  SCOPES")
    for r in rows:
        status = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        name = r["name"] or "-"
        print(
            f"{r['id']:>6}  {name:<20}  {r['created_at']:<25}  {status:<33}  "
            + " ".join(r["scopes"])
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    async def revoke(conn: asyncpg.Connection) -> tuple[ApiKey | None, int]:
        key = await keys_sql.revoke_key(conn, args.id)
        return key, len(await keys_sql.active_keys(conn))

    key, remaining = _run(revoke)
    if key is None:
        print(f"sluice keys revoke: no API key with id {args.id}", file=sys.stderr)
        return 1
    assert key.revoked_at is not None
    print(
        f"revoked key {key.id} (since {key.revoked_at.isoformat()}); "
        "every server refuses it within 10 s"
    )
    if remaining == 0:
        print(
            "warning: no active API keys remain: every /v1 request and /metrics are refused "
            "(401) until you create one with `sluice keys create --scope admin`",
            file=sys.stderr,
        )
    return 0


CONFIRM_OPEN = "--yes-i-mean-it"


def cmd_open(args: argparse.Namespace) -> int:
    if not args.yes_i_mean_it:
        print(
            "sluice keys open: this deletes every API key, revoked ones included, and lets "
            f"anyone use the API without a key; run `sluice keys open {CONFIRM_OPEN}` to do it",
            file=sys.stderr,
        )
        return 2

    async def delete_all(conn: asyncpg.Connection) -> tuple[int, int]:
        async with conn.transaction():
            return await keys_sql.delete_all_keys(conn)

    deleted, active = _run(delete_all)
    if deleted == 0:
        print("the API is already open: no API key exists", file=sys.stderr)
        return 0
    log.warning(
        "deleted every API key: the API is open to anyone",
        extra={"keys_deleted": deleted, "active_keys_deleted": active},
    )
    print(
        f"WARNING: deleted {deleted} API key{'s' if deleted != 1 else ''} ({active} active): "
        "the API is open to anyone on every server within 10 s, until a key is created",
        file=sys.stderr,
    )
    return 0


def add_keys_parser(sub: Any) -> None:
    """Add `keys` and its subcommands to the `sluice` parser's subparsers."""
    keys = sub.add_parser("keys", help="manage API keys (access control)")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser(
        "create",
        help="create a key and print its secret once",
        description="Scopes: admin, publish:<topic-glob>, consume:<topic-glob>, "
        "read:<topic-glob> (shell-style globs, e.g. orders-*).",
    )
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        metavar="SCOPE",
        help="admin | publish:<glob> | consume:<glob> | read:<glob> (repeatable)",
    )
    create.add_argument("--name", help="a label shown by `keys list`")
    create.add_argument(
        "--sqs",
        action="store_true",
        help="also issue SQS credentials (AWS access key id and secret, SigV4) with the "
        "same scopes; needs SLUICE_SQS_SECRET",
    )
    create.set_defaults(func=cmd_create)

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)

    revoke = actions.add_parser(
        "revoke",
        help="revoke a key by id",
        description="A revoked key is refused within 10 s. Revoking every key leaves the API "
        "closed to everyone (not open): create a new key to get in.",
    )
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=cmd_revoke)

    opening = actions.add_parser(
        "open",
        help="delete every key: the API is open to anyone again",
        description="Deletes every API key, revoked ones included, so that no key has ever "
        "existed as far as the service knows: every server lets anyone in within 10 s. "
        f"Refused without {CONFIRM_OPEN}.",
    )
    opening.add_argument(
        CONFIRM_OPEN, action="store_true", help="confirm: delete every key and open the API"
    )
    opening.set_defaults(func=cmd_open)
