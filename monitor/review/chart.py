"""Server-side SVG chart of the rating estimate over time, one line per stream.

The page's Content-Security-Policy forbids scripts and inline styles, so the
chart is plain SVG with presentation attributes (``fill``, ``stroke``...).
Stream names come from the traffic (attacker-controlled): every text node and
attribute value is XML-escaped.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape
from typing import Any

# Colour-blind-safe palette (Okabe-Ito), cycled over streams.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MAX_STREAMS = 12
MAX_POINTS = 2000
MAX_LABEL = 40

_ML, _MR, _MT = 48, 12, 12  # margins: left (y labels), right, top


def _x(s: Any) -> str:
    """Escape for XML text and attribute values."""
    return escape(str(s), quote=True)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def _time_label(ts: float, span: float) -> str:
    d = datetime.fromtimestamp(ts, UTC)
    if span <= 86400:
        return d.strftime("%H:%M")
    return d.strftime("%m-%d %H:%M") if span <= 14 * 86400 else d.strftime("%Y-%m-%d")


def _runs(points: list[tuple[float, float | None, float | None, float | None]]) -> list[list[tuple[float, ...]]]:
    """Split a series at missing means: each run is drawn as its own polyline."""
    runs: list[list[tuple[float, ...]]] = []
    cur: list[tuple[float, ...]] = []
    for x, mean, low, high in points:
        if mean is None:
            if cur:
                runs.append(cur)
            cur = []
            continue
        lo = mean if low is None else min(low, mean)
        hi = mean if high is None else max(high, mean)
        cur.append((x, mean, lo, hi))
    if cur:
        runs.append(cur)
    return runs


def estimates_svg(series: dict[str, list[dict[str, Any]]], width: int = 720, height: int = 240) -> str:
    """An SVG line chart: per stream the mean (polyline) and its 95% CI (shaded band).

    ``series`` maps a stream to ``[{"start": epoch, "mean", "ci_low", "ci_high", "n"}, ...]``;
    ``None`` or non-finite values leave a gap.
    """
    width = max(200, int(width))
    height = max(120, int(height))
    legend_rows = (min(len(series), MAX_STREAMS) + 2) // 3 + (len(series) > MAX_STREAMS)
    total_h = height + 16 * legend_rows  # below the plot: x labels, then a 3-column legend
    pw, ph = width - _ML - _MR, height - _MT - 28

    cleaned: list[tuple[str, list[tuple[float, float | None, float | None, float | None]]]] = []
    for name, rows in list(series.items())[:MAX_STREAMS]:
        pts = []
        for r in rows[-MAX_POINTS:] if isinstance(rows, list) else []:
            if not isinstance(r, dict):
                continue
            start = _num(r.get("start"))
            if start is None:
                continue
            pts.append((start, _num(r.get("mean")), _num(r.get("ci_low")), _num(r.get("ci_high"))))
        pts.sort(key=lambda p: p[0])
        cleaned.append((str(name), pts))

    xs = [p[0] for _, pts in cleaned for p in pts if p[1] is not None]
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" role="img" aria-labelledby="chart-title" font-family="sans-serif" '
        f'font-size="11">'
        '<title id="chart-title">Estimated mean rating over time per stream, with 95% confidence bands</title>'
    )
    if not xs:
        return (
            head + f'<rect x="0.5" y="0.5" width="{width - 1}" height="{total_h - 1}" fill="none" stroke="#ccc"/>'
            f'<text x="{width / 2:.1f}" y="{total_h / 2:.1f}" text-anchor="middle" fill="#555">'
            "No rating estimates yet</text></svg>"
        )

    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 1:
        x0, x1 = x0 - 1800, x1 + 1800
    vals = [v for _, pts in cleaned for p in pts if p[1] is not None for v in p[1:] if v is not None]
    y0, y1 = min([1.0, *vals]), max([7.0, *vals])

    def sx(v: float) -> float:
        return _ML + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return _MT + (1 - (v - y0) / (y1 - y0)) * ph

    out = [head]
    # Axes and grid.
    out.append('<g stroke="#ccc" stroke-width="1" fill="none">')
    ticks_y = [float(v) for v in range(math.ceil(y0), math.floor(y1) + 1)]
    if len(ticks_y) > 10:
        ticks_y = ticks_y[:: math.ceil(len(ticks_y) / 10)]
    for v in ticks_y:
        out.append(f'<line x1="{_ML}" x2="{_ML + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}"/>')
    out.append("</g>")
    out.append(
        f'<g stroke="#333" stroke-width="1"><line x1="{_ML}" x2="{_ML}" y1="{_MT}" y2="{_MT + ph}"/>'
        f'<line x1="{_ML}" x2="{_ML + pw}" y1="{_MT + ph}" y2="{_MT + ph}"/></g>'
    )
    out.append('<g fill="#333" text-anchor="end">')
    for v in ticks_y:
        out.append(f'<text x="{_ML - 6}" y="{sy(v) + 4:.1f}">{_x(_fmt(v))}</text>')
    out.append("</g>")
    n_xt = max(2, min(6, pw // 110))
    out.append('<g fill="#333" text-anchor="middle">')
    for i in range(n_xt):
        v = x0 + (x1 - x0) * i / (n_xt - 1)
        px = sx(v)
        anchor = ' text-anchor="start"' if i == 0 else (' text-anchor="end"' if i == n_xt - 1 else "")
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_MT + ph}" y2="{_MT + ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{px:.1f}" y="{_MT + ph + 16}"{anchor}>{_x(_time_label(v, x1 - x0))} UTC</text>')
    out.append("</g>")

    # Bands first, then lines on top.
    lines: list[str] = []
    for i, (name, pts) in enumerate(cleaned):
        colour = PALETTE[i % len(PALETTE)]
        out.append(f"<g><title>{_x(name)}</title>")
        for run in _runs(pts):
            if len(run) == 1:  # a lone estimate: its CI as an error bar
                x, _, lo, hi = run[0]
                out.append(
                    f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" '
                    f'stroke="{colour}" stroke-opacity="0.5" stroke-width="6"/>'
                )
                continue
            upper = " ".join(f"{sx(p[0]):.1f},{sy(p[3]):.1f}" for p in run)
            lower = " ".join(f"{sx(p[0]):.1f},{sy(p[2]):.1f}" for p in reversed(run))
            out.append(f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        out.append("</g>")
        lines.append(f"<g><title>{_x(name)}</title>")
        for run in _runs(pts):
            pl = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in run)
            if len(run) == 1:
                lines.append(f'<circle cx="{sx(run[0][0]):.1f}" cy="{sy(run[0][1]):.1f}" r="3" fill="{colour}"/>')
            else:
                lines.append(f'<polyline points="{pl}" fill="none" stroke="{colour}" stroke-width="2"/>')
        lines.append("</g>")
    out.extend(lines)

    # Legend, three columns under the x axis.
    col_w = (width - _ML) / 3
    for i, (name, _) in enumerate(cleaned):
        colour = PALETTE[i % len(PALETTE)]
        lx = _ML + (i % 3) * col_w
        ly = _MT + ph + 34 + (i // 3) * 16
        out.append(
            f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="10" fill="{colour}"/>'
            f'<text x="{lx + 16:.1f}" y="{ly}" fill="#333">{_x(_short(name))}</text>'
        )
    if len(series) > MAX_STREAMS:
        out.append(
            f'<text x="{width - _MR}" y="{total_h - 4}" text-anchor="end" fill="#555">'
            f"{len(series) - MAX_STREAMS} more streams not shown</text>"
        )
    out.append("</svg>")
    return "".join(out)
