"""The held-xmin chart as a hand-written SVG (no plotting dependency): per-block publish
(solid) and drain (dashed) msgs/s of each system over time, the held window shaded, and
below it the dead row versions of each system's tables (log scale)."""

from __future__ import annotations

import math
from html import escape

from bench.held_xmin import Outcome

COLORS = {"sluice": "#1f77b4", "raw": "#ff7f0e", "pgmq": "#2ca02c"}
OTHER = ("#9467bd", "#8c564b", "#e377c2")
WIDTH, LEFT, RIGHT = 980, 80, 20
TOP_Y, TOP_H = 70, 300  # throughput panel
LOW_Y, LOW_H = 430, 200  # dead row versions panel
HEIGHT = LOW_Y + LOW_H + 60


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for f in (1, 2, 2.5, 5, 10):
        if raw <= f * magnitude:
            return f * magnitude
    return 10 * magnitude


def _fmt(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def held_xmin_svg(outcomes: list[Outcome]) -> str:
    span = max((b.start + b.seconds for o in outcomes for b in o.blocks), default=1.0) or 1.0
    top_rate = max(
        (max(b.publish_rate, b.drain_rate) for o in outcomes for b in o.blocks), default=1.0
    )
    step_rate = _nice_step(top_rate or 1.0)
    top_rate = math.ceil((top_rate or 1.0) / step_rate) * step_rate
    dead_max = max(
        (b.dead.total for o in outcomes for b in o.blocks if b.dead is not None), default=1
    )
    decades = max(1, math.ceil(math.log10(dead_max + 1)))
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + plot_w * t / span

    def y_rate(v: float) -> float:
        return TOP_Y + TOP_H * (1 - v / top_rate)

    def y_dead(v: float) -> float:
        return LOW_Y + LOW_H * (1 - math.log10(v + 1) / decades)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    s = outcomes[0].settings if outcomes else None
    title = "Held xmin horizon"
    if s is not None:
        title += (
            f" ({s.mode}): {s.messages:,} msgs per {s.block_seconds:g}-s block, "
            f"{s.hold_seconds:g}-s hold"
        )
    out.append(f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>')
    # held windows
    for o in outcomes:
        out.append(
            f'<rect x="{x(o.hold_open):.1f}" y="{TOP_Y}" '
            f'width="{max(1.0, x(o.hold_close) - x(o.hold_open)):.1f}" '
            f'height="{LOW_Y + LOW_H - TOP_Y}" fill="#888" fill-opacity="0.10"/>'
        )
    if outcomes:
        o = outcomes[0]
        out.append(
            f'<text x="{x(o.hold_open) + 4:.1f}" y="{TOP_Y + 14}" fill="#555">'
            "long transaction open</text>"
        )
    # axes and grid
    for panel_y, panel_h in ((TOP_Y, TOP_H), (LOW_Y, LOW_H)):
        out.append(
            f'<rect x="{LEFT}" y="{panel_y}" width="{plot_w}" height="{panel_h}" '
            'fill="none" stroke="#333"/>'
        )
    v = 0.0
    while v <= top_rate + 1e-9:
        yy = y_rate(v)
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
        v += step_rate
    for d in range(decades + 1):
        yy = y_dead(10**d - 1)
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>'
        )
        label = "0" if d == 0 else _fmt(10**d)
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{label}</text>')
    step_t = _nice_step(span, 10)
    t = 0.0
    while t <= span + 1e-9:
        xx = x(t)
        for panel_y, panel_h in ((TOP_Y, TOP_H), (LOW_Y, LOW_H)):
            out.append(
                f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{panel_y + panel_h}" '
                f'y2="{panel_y + panel_h + 4}" stroke="#333"/>'
            )
            out.append(
                f'<text x="{xx:.1f}" y="{panel_y + panel_h + 17}" text-anchor="middle">{t:g}</text>'
            )
        t += step_t
    out.append(
        f'<text x="18" y="{TOP_Y + TOP_H / 2}" transform="rotate(-90 18 {TOP_Y + TOP_H / 2})" '
        'text-anchor="middle">msgs/s per block</text>'
    )
    out.append(
        f'<text x="18" y="{LOW_Y + LOW_H / 2}" transform="rotate(-90 18 {LOW_Y + LOW_H / 2})" '
        'text-anchor="middle">dead row versions</text>'
    )
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{LOW_Y + LOW_H + 36}" text-anchor="middle">'
        "seconds since the system's workload started</text>"
    )
    # series
    for i, o in enumerate(outcomes):
        color = COLORS.get(o.system, OTHER[i % len(OTHER)])
        for attr, dash in (("publish_rate", ""), ("drain_rate", ' stroke-dasharray="6 4"')):
            points = []
            for b in o.blocks:
                rate = getattr(b, attr)
                points += [(x(b.start), y_rate(rate)), (x(b.start + b.seconds), y_rate(rate))]
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
            )
        dead = [(b.dead.at, b.dead.total) for b in o.blocks if b.dead is not None]
        if o.dead_at_open is not None:
            dead.append((o.dead_at_open.at, o.dead_at_open.total))
        if o.dead_at_close is not None:
            dead.append((o.dead_at_close.at, o.dead_at_close.total))
        dead.sort()
        path = " ".join(f"{x(t):.1f},{y_dead(n):.1f}" for t, n in dead)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for t, n in dead:
            out.append(f'<circle cx="{x(t):.1f}" cy="{y_dead(n):.1f}" r="2.5" fill="{color}"/>')
    # legend
    lx = LEFT
    for i, o in enumerate(outcomes):
        color = COLORS.get(o.system, OTHER[i % len(OTHER)])
        out.append(
            f'<line x1="{lx}" x2="{lx + 24}" y1="46" y2="46" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{lx + 28}" y="50">{escape(o.system)} publish</text>')
        lx += 120
        out.append(
            f'<line x1="{lx}" x2="{lx + 24}" y1="46" y2="46" stroke="{color}" '
            'stroke-width="2" stroke-dasharray="6 4"/>'
        )
        out.append(f'<text x="{lx + 28}" y="50">drain</text>')
        lx += 90
    counted = "pgstattuple" if outcomes and all(o.pgstattuple for o in outcomes) else "n_dead_tup"
    out.append(
        f'<text x="{LEFT + 4}" y="{LOW_Y + 14}" fill="#555">dead row versions of each system\'s '
        f"tables ({counted}), after each block's traffic</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
