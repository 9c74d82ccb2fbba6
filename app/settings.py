"""Every setting of the service, read from the environment (SPEC section 5)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore")

    # A plain postgresql://user@host:port/db URL; unset means "start the embedded Postgres".
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    data_dir: Path = Path(".sluice")
    db_pool_size: int = Field(default=10, ge=1, le=200)
    log_level: str = "INFO"
    # json: one JSON object per line; text: lines for people; auto: text when stderr is a
    # terminal, JSON otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"
    migrations_dir: Path | None = None
    # A migration's DDL waits at most this long for a lock another transaction holds
    # (pg_dump, a long report): while it waits, every query of that table queues behind it
    # (PITFALLS). Refused, the migration has rolled back and is tried again, for at most
    # migration_lock_wait_seconds in all; then `migrate` fails and says why.
    migration_lock_timeout_seconds: float = Field(default=2.0, gt=0)
    migration_lock_wait_seconds: float = Field(default=600.0, ge=0)

    # HTTP limits (PITFALLS: Starlette has no body limit; deep JSON exhausts recursion).
    max_body_bytes: int = 10 * 1024 * 1024
    # Bounded so that checking a document's depth can never exhaust Python's recursion.
    max_json_depth: int = Field(default=64, ge=1, le=500)

    # How often a waiting long-poll re-checks the database even without a notification:
    # a safety net for lost notifications, not the normal wake-up path.
    poll_recheck_seconds: float = 5.0
    # Background maintenance: retention floors, deadlines nobody pulls for, segments.
    maintenance_interval_seconds: float = 5.0
    # Seconds an idle LISTEN connection waits before a keepalive query proves it alive.
    listener_keepalive_seconds: float = 5.0
    # Publishes notify only the topics some process has a long-poll waiting for; a process
    # keeps saying so this long after its last long-poll of a topic ended, so that consumers
    # that poll again and again do not declare and withdraw it on every pull.
    listener_linger_seconds: float = Field(default=30.0, ge=0)
    # The SQL API's relay (outbox -> log): a pass at least this often even without a
    # notification, at most this many outbox rows per pass (and transaction).
    relay_interval_seconds: float = Field(default=1.0, gt=0)
    # Whether this process runs a relay at all (one pass at a time runs cluster-wide, so
    # turning it off somewhere only matters for dedicated relay processes, or tests).
    sql_relay: bool = True
    relay_batch: int = Field(default=5000, ge=1, le=100_000)
    # Each of the outbox's three partitions takes new rows for this long before the next
    # one does; a partition is emptied (TRUNCATE) once all of it has been relayed.
    outbox_rotate_seconds: float = Field(default=30.0, gt=0)
    # The SQS endpoint (docs/sqs.md): the account id and region of its queue URLs and
    # ARNs, and the server secret every SQS signing secret is derived from
    # (HMAC-SHA256(secret, access key id)); without it, SQS credentials cannot be issued
    # or checked. Rotating it changes every SQS secret at once.
    sqs_account_id: str = Field(default="000000000000", pattern=r"^[0-9]{12}$")
    sqs_region: str = Field(default="us-east-1", pattern=r"^[a-z0-9-]{1,40}$")
    sqs_secret: str | None = Field(default=None, repr=False)
    # During a rotation of sqs_secret: the one before, still accepted (docs/sqs.md).
    sqs_previous_secret: str | None = Field(default=None, repr=False)

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
