"""The results table's arithmetic (bench/stats.py): no database needed."""

from __future__ import annotations

import pytest

from bench.stats import Result, format_table, postgres_us_per_message


def _column(table: str, header: str) -> str:
    """The first data row's cell under `header`."""
    lines = table.splitlines()
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    return cells[headers.index(header)]


def test_postgres_cpu_per_message_is_its_share_of_a_core_over_the_rate() -> None:
    row = Result("consume b1", "sluice", messages=2_000, seconds=2.0, cpu={"pg": 50.0})
    # half a core for 1,000 messages a second: 500 µs of Postgres CPU each
    assert postgres_us_per_message(row) == pytest.approx(500.0)
    assert row.as_dict()["pg_us_per_message"] == pytest.approx(500.0)
    assert _column(format_table([row]), "pg µs/msg") == "500"


@pytest.mark.parametrize(
    "row",
    [
        Result("publish b1", "rabbitmq", messages=10, seconds=1.0, cpu={"server": 30.0}),
        Result("publish b1", "sluice", messages=0, seconds=1.0, cpu={"pg": 20.0}),
        Result("idle", "sluice", messages=10, seconds=1.0, cpu={"pg": 1.0}, throughput=False),
    ],
    ids=["no-postgres", "nothing-moved", "not-a-throughput-phase"],
)
def test_postgres_cpu_per_message_is_left_out_where_it_means_nothing(row: Result) -> None:
    assert postgres_us_per_message(row) is None
    assert _column(format_table([row]), "pg µs/msg") == "-"
