"""API keys for access control.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A global table: keys are not data of a topic, so the rule "every table leads with the
    # topic" (for distributing by topic on Citus) does not apply; on Citus it would be a
    # reference table. Only the SHA-256 of each secret is stored; secrets are high-entropy
    # random strings, so an unsalted hash is enough and lets a request find its key by an
    # index lookup. Revoked keys stay (revoked_at set) so `sluice keys list` shows history.
    op.execute(
        """
        CREATE TABLE api_keys (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name        text,
            secret_hash text NOT NULL UNIQUE,
            scopes      text[] NOT NULL CHECK (cardinality(scopes) > 0),
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            revoked_at  timestamptz
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE api_keys")
