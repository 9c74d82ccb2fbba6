"""What the revisions that replace PL/pgSQL functions share: running a .sql file as it is,
and putting back a function as an earlier revision's file defines it (one definition of a
body, never a copy)."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import op

VERSIONS = Path(__file__).resolve().parent / "versions"


def run_sql(sql: str) -> None:
    """Run SQL text on the migration's own connection through asyncpg's simple-query path:
    it takes many statements, and SQLAlchemy's text() would read `:name` inside a function
    body as a bind parameter."""
    from sqlalchemy.util import await_only

    raw = op.get_bind().connection.driver_connection
    await_only(raw.execute(sql))


def run_file(name: str) -> None:
    """Run the .sql file `name` of migrations/versions."""
    run_sql((VERSIONS / name).read_text())


def function_definition(revision_file: str, function: str) -> str:
    """The CREATE OR REPLACE statement of `function` (schema-qualified) as `revision_file` (a
    .sql file of migrations/versions) created it."""
    text = (VERSIONS / revision_file).read_text()
    pattern = rf"^CREATE (?:OR REPLACE )?FUNCTION {re.escape(function)}\(.*?^(?:END )?\$\$;"
    found = re.search(pattern, text, re.S | re.M)
    assert found is not None, f"{function} not found in {revision_file}"
    return re.sub(r"^CREATE (?:OR REPLACE )?", "CREATE OR REPLACE ", found.group(0))


def restore_function(revision_file: str, function: str) -> None:
    """CREATE OR REPLACE `function` with the body `revision_file` created it with."""
    run_sql(function_definition(revision_file, function))


def patch_function(revision_file: str, function: str, edits: list[tuple[str, str]]) -> None:
    """CREATE OR REPLACE `function` with the body `revision_file` created it with, each
    (old, new) edit applied: a revision that changes a few lines of a long function states
    those lines rather than a copy of the whole body. Each `old` must occur exactly once (a
    released revision's file never changes, so an edit that no longer applies is a bug).
    `revision_file` must be the revision that last defined the function: an edit applied to
    an older body would silently undo what came after it."""
    definition = function_definition(revision_file, function)
    for old, new in edits:
        count = definition.count(old)
        assert count == 1, f"{function} in {revision_file}: {count} matches for {old!r}"
        definition = definition.replace(old, new)
    run_sql(definition)
