"""`sluice sql grant ROLE --publish --consume --read` and `sluice sql revoke ROLE`: what an
application's database role may do through the SQL API (publish and ack inside its own
transactions, read the views). `--print` shows the statements instead of running them, for
a DBA to review or to put in the application's own migrations."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg

from sluice.access.cli import _run
from sluice.storage import grants


def cmd_grant(args: argparse.Namespace) -> int:
    if not (args.publish or args.consume or args.read):
        print("sluice sql grant: say what: --publish, --consume and/or --read", file=sys.stderr)
        return 2
    if args.print:
        for statement in grants.grant_statements(args.role, args.publish, args.consume, args.read):
            print(statement + ";")
        return 0

    async def job(conn: asyncpg.Connection) -> bool:
        if not await grants.role_exists(conn, args.role):
            return False
        await grants.grant(
            conn, args.role, publish=args.publish, consume=args.consume, read=args.read
        )
        return True

    if not _run(job):
        print(f"sluice sql grant: no role named {args.role!r}", file=sys.stderr)
        return 1
    what = [
        w
        for w, on in (("publish", args.publish), ("consume", args.consume), ("read", args.read))
        if on
    ]
    print(f"role {args.role} may now {', '.join(what)} through the SQL API", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.print:
        for statement in grants.revoke_statements(args.role):
            print(statement + ";")
        return 0

    async def job(conn: asyncpg.Connection) -> bool:
        if not await grants.role_exists(conn, args.role):
            return False
        await grants.revoke(conn, args.role)
        return True

    if not _run(job):
        print(f"sluice sql revoke: no role named {args.role!r}", file=sys.stderr)
        return 1
    print(f"role {args.role} may no longer use the SQL API", file=sys.stderr)
    return 0


def add_sql_parser(sub: Any) -> None:
    sql = sub.add_parser("sql", help="privileges of application roles on the SQL API")
    actions = sql.add_subparsers(dest="sql_command", required=True)
    granting = actions.add_parser(
        "grant",
        help="let a database role publish, consume and/or read through SQL",
        description="--publish: sluice.send / send_batch; --consume: sluice.ack / nack; "
        "--read: the views (topic_messages, topic_stats, subscription_stats, "
        "dead_letter_messages). Never a privilege on a table.",
    )
    granting.add_argument("role")
    granting.add_argument("--publish", action="store_true")
    granting.add_argument("--consume", action="store_true")
    granting.add_argument("--read", action="store_true")
    granting.add_argument("--print", action="store_true", help="print the GRANTs, run nothing")
    granting.set_defaults(func=cmd_grant)
    revoking = actions.add_parser("revoke", help="take every SQL API privilege from a role")
    revoking.add_argument("role")
    revoking.add_argument("--print", action="store_true", help="print the REVOKEs, run nothing")
    revoking.set_defaults(func=cmd_revoke)
