"""Injectable time: every deadline is computed by Postgres as clock_timestamp() + skew.

Production never moves the skew. Tests advance it to expire leases and end delays
without sleeping. Only in-process tests can do that; it is never exposed over HTTP.
"""

from __future__ import annotations


class Clock:
    def __init__(self) -> None:
        self.skew = 0.0

    def advance(self, seconds: float) -> None:
        self.skew += seconds
