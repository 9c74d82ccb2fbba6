"""Measurements of one phase, and the results table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class Result:
    """One row of the table: one workload run against one system."""

    workload: str
    system: str
    messages: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    cpu: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The latency column: "op" (request round trip), "e2e" (publish -> delivery), "wake".
    latency_kind: str = "op"
    ratios: dict[str, float] = field(default_factory=dict)
    throughput: bool = True  # False: a fixed-rate or idle phase, where msgs/s is no score
    # msgs/s when it is not messages / seconds (held-xmin: the median of the held blocks)
    fixed_rate: float | None = None

    @property
    def rate(self) -> float:
        if self.fixed_rate is not None:
            return self.fixed_rate
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float | None:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float | None:
        return percentile(self.latencies_ms, 99)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_ms")
        data.update(
            rate=self.rate,
            p50_ms=self.p50,
            p99_ms=self.p99,
            samples=len(self.latencies_ms),
            pg_us_per_message=postgres_us_per_message(self),
        )
        return data


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _cpu(result: Result) -> str:
    parts = []
    # "server": the system's own server process tree (Sluice, or RabbitMQ's broker).
    for key, label in (("server", result.system), ("pg", "pg"), ("bench", "bench")):
        value = result.cpu.get(key)
        if value is not None:
            parts.append(f"{label} {value:.0f}")
    return " / ".join(parts) or "-"


def postgres_us_per_message(result: Result) -> float | None:
    """Postgres CPU (all its processes, background writers included) per message moved, in
    microseconds: what sizing the database goes by, since API processes scale out and the
    database does not. None for a phase that is no throughput or saw no Postgres CPU."""
    pg = result.cpu.get("pg")
    if pg is None or not result.throughput or result.rate <= 0:
        return None
    return pg / 100 * 1_000_000 / result.rate


def keep_medians(results: list[Result]) -> list[Result]:
    """One row per (workload, system): where a phase was repeated, the row with the median
    msgs/s, noting every repetition's rate; rows keep their first position."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for row in results:
        groups.setdefault((row.workload, row.system), []).append(row)
    kept: list[Result] = []
    for row in results:
        group = groups.pop((row.workload, row.system), None)
        if group is None:
            continue
        if len(group) == 1:
            kept.append(row)
            continue
        ranked = sorted(group, key=lambda r: r.rate)
        median = ranked[(len(ranked) - 1) // 2]
        rates = ", ".join(f"{r.rate:,.0f}" for r in group)
        median.notes.append(f"median of {len(group)} runs in rotated order ({rates})")
        median.errors = sum(r.errors for r in group)
        kept.append(median)
    return kept


def add_ratios(
    results: list[Result], baseline_of: dict[str, str], same_work: dict[str, str] | None = None
) -> None:
    """For each Sluice row, msgs/s divided by each peer's msgs/s on the same workload.

    `baseline_of` maps a workload to another workload whose Sluice row is the reference
    (e.g. "publish b100 (2 workers)" -> "publish b100"), reported as "vs 1w"/"vs 1 sub".
    `same_work` maps a Sluice-only variant to the workload whose peer rows it is compared
    with (e.g. "consume b100 ack-in-pull" -> "consume b100").
    """
    same_work = same_work or {}
    by_key = {(r.workload, r.system): r for r in results}
    for row in results:
        if row.system != "sluice":
            continue
        for peer in ("raw", "pgmq"):
            other = by_key.get((same_work.get(row.workload, row.workload), peer))
            if other is not None and other.rate > 0 and row.throughput:
                row.ratios[peer] = row.rate / other.rate
    for workload, reference in baseline_of.items():
        for system in ("sluice", "raw", "pgmq"):
            row, ref = by_key.get((workload, system)), by_key.get((reference, system))
            if row is not None and ref is not None and ref.rate > 0:
                row.ratios["ref"] = row.rate / ref.rate
                row.notes.append(f"{row.rate / ref.rate:.2f}x of '{reference}'")


def format_table(results: list[Result]) -> str:
    headers = [
        "workload",
        "system",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "latency of",
        "vs raw",
        "vs pgmq",
        "cpu % (server/pg/bench)",
        "pg µs/msg",
        "errors",
        "notes",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.workload,
                r.system,
                _num(r.rate, 0) if r.throughput else f"({_num(r.rate, 0)})",
                _num(r.p50, 2),
                _num(r.p99, 2),
                r.latency_kind,
                f"{r.ratios['raw']:.2f}x" if "raw" in r.ratios else "",
                f"{r.ratios['pgmq']:.2f}x" if "pgmq" in r.ratios else "",
                _cpu(r),
                _num(postgres_us_per_message(r), 0),
                str(r.errors),
                "; ".join(r.notes),
            ]
        )
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)
