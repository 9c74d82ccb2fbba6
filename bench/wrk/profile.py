"""Summaries of py-spy profiles (`py-spy record --format raw`: one line per distinct stack,
frames separated by `;`, the sample count last), for bench/RESULTS.md.

    .venv/bin/python -m bench.wrk.profile FILE [--top 30] [--under FUNCTION]

Prints, for the busiest functions, the share of samples whose stack passes through them
(inclusive) and the share where they are on top (self). Idle samples (the event loop
waiting in select/epoll) are counted apart, so shares are of the busy samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`handle (starlette/routing.py:123)` -> `handle (starlette/routing.py)`: one entry per
    function, whatever line was running."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/app/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['name']} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([frame_name(f) for f in stack.split(";")], int(count)))
    return stacks


def is_idle(frames: list[str]) -> bool:
    top = frames[-1]
    return "select" in top or "poll" in top or "epoll" in top


def summarise(path: Path, top: int = 30, under: str | None = None) -> str:
    stacks = load(path)
    if under:
        stacks = [
            (f[next(i for i, x in enumerate(f) if under in x) :], n)
            for f, n in stacks
            if any(under in x for x in f)
        ]
    total = sum(n for _, n in stacks)
    idle = sum(n for f, n in stacks if is_idle(f))
    busy = total - idle or 1
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in stacks:
        if is_idle(frames):
            continue
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    lines = [
        f"{path.name}: {total} samples, {idle} idle ({100 * idle / max(total, 1):.0f}%); "
        f"shares of the {busy} busy samples" + (f" under {under}" if under else ""),
        "| inclusive | self | function |",
        "|---|---|---|",
    ]
    for name, n in inclusive.most_common(top):
        lines.append(f"| {100 * n / busy:.1f}% | {100 * own[name] / busy:.1f}% | `{name}` |")
    lines.append("")
    lines.append("Top self:")
    for name, n in own.most_common(top // 2):
        lines.append(f"- {100 * n / busy:.1f}% `{name}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--under", help="only stacks through this function, from it down")
    args = p.parse_args()
    print(summarise(args.file, args.top, args.under))


if __name__ == "__main__":
    main()
