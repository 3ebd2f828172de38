"""Server-side SVG chart of the rating estimate over time, one line per stream.

The page's Content-Security-Policy forbids scripts and inline styles, so the
chart is plain SVG with presentation attributes (``fill``, ``stroke``...).
Stream names come from the traffic (attacker-controlled): every text node and
attribute value is XML-escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


Point = tuple[float, float | None, float | None, float | None]  # (start, mean, ci_low, ci_high)


@dataclass(frozen=True)
class Frame:
    """The plot's geometry: data ranges and the plot area, and the maps from data to pixels."""

    width: int
    total_h: int
    pw: int  # plot width
    ph: int  # plot height
    x0: float
    x1: float
    y0: float
    y1: float

    def sx(self, v: float) -> float:
        return _ML + (v - self.x0) / (self.x1 - self.x0) * self.pw

    def sy(self, v: float) -> float:
        return _MT + (1 - (v - self.y0) / (self.y1 - self.y0)) * self.ph


def _clean(series: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[Point]]]:
    """The first :data:`MAX_STREAMS` streams, each its last :data:`MAX_POINTS` well-formed points in time order."""
    cleaned: list[tuple[str, list[Point]]] = []
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
    return cleaned


def _frame(cleaned: list[tuple[str, list[Point]]], xs: list[float], width: int, height: int, total_h: int) -> Frame:
    """Time from the first to the last estimate (an hour around a lone one); ratings 1-7 at least."""
    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 1:
        x0, x1 = x0 - 1800, x1 + 1800
    vals = [v for _, pts in cleaned for p in pts if p[1] is not None for v in p[1:] if v is not None]
    y0, y1 = min([1.0, *vals]), max([7.0, *vals])
    return Frame(width, total_h, width - _ML - _MR, height - _MT - 28, x0, x1, y0, y1)


def _axes(f: Frame) -> list[str]:
    """Grid lines, the two axes, and the labels of both."""
    out = ['<g stroke="#ccc" stroke-width="1" fill="none">']
    ticks_y = [float(v) for v in range(math.ceil(f.y0), math.floor(f.y1) + 1)]
    if len(ticks_y) > 10:
        ticks_y = ticks_y[:: math.ceil(len(ticks_y) / 10)]
    for v in ticks_y:
        out.append(f'<line x1="{_ML}" x2="{_ML + f.pw}" y1="{f.sy(v):.1f}" y2="{f.sy(v):.1f}"/>')
    out.append("</g>")
    out.append(
        f'<g stroke="#333" stroke-width="1"><line x1="{_ML}" x2="{_ML}" y1="{_MT}" y2="{_MT + f.ph}"/>'
        f'<line x1="{_ML}" x2="{_ML + f.pw}" y1="{_MT + f.ph}" y2="{_MT + f.ph}"/></g>'
    )
    out.append('<g fill="#333" text-anchor="end">')
    for v in ticks_y:
        out.append(f'<text x="{_ML - 6}" y="{f.sy(v) + 4:.1f}">{_x(_fmt(v))}</text>')
    out.append("</g>")
    return out + _time_axis(f)


def _time_axis(f: Frame) -> list[str]:
    n_xt = max(2, min(6, f.pw // 110))
    out = ['<g fill="#333" text-anchor="middle">']
    for i in range(n_xt):
        v = f.x0 + (f.x1 - f.x0) * i / (n_xt - 1)
        px = f.sx(v)
        anchor = ' text-anchor="start"' if i == 0 else (' text-anchor="end"' if i == n_xt - 1 else "")
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_MT + f.ph}" y2="{_MT + f.ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{px:.1f}" y="{_MT + f.ph + 16}"{anchor}>{_x(_time_label(v, f.x1 - f.x0))} UTC</text>')
    out.append("</g>")
    return out


def _band(f: Frame, name: str, pts: list[Point], colour: str) -> list[str]:
    """A stream's 95% interval: a shaded band per run, an error bar for a lone estimate."""
    out = [f"<g><title>{_x(name)}</title>"]
    for run in _runs(pts):
        if len(run) == 1:  # a lone estimate: its CI as an error bar
            x, _, lo, hi = run[0]
            out.append(
                f'<line x1="{f.sx(x):.1f}" x2="{f.sx(x):.1f}" y1="{f.sy(lo):.1f}" y2="{f.sy(hi):.1f}" '
                f'stroke="{colour}" stroke-opacity="0.5" stroke-width="6"/>'
            )
            continue
        upper = " ".join(f"{f.sx(p[0]):.1f},{f.sy(p[3]):.1f}" for p in run)
        lower = " ".join(f"{f.sx(p[0]):.1f},{f.sy(p[2]):.1f}" for p in reversed(run))
        out.append(f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
    out.append("</g>")
    return out


def _line(f: Frame, name: str, pts: list[Point], colour: str) -> list[str]:
    """A stream's mean: a polyline per run, a dot for a lone estimate."""
    out = [f"<g><title>{_x(name)}</title>"]
    for run in _runs(pts):
        pl = " ".join(f"{f.sx(p[0]):.1f},{f.sy(p[1]):.1f}" for p in run)
        if len(run) == 1:
            out.append(f'<circle cx="{f.sx(run[0][0]):.1f}" cy="{f.sy(run[0][1]):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline points="{pl}" fill="none" stroke="{colour}" stroke-width="2"/>')
    out.append("</g>")
    return out


def _legend(f: Frame, cleaned: list[tuple[str, list[Point]]], n_series: int) -> list[str]:
    """Three columns under the x axis; a note when streams were left out."""
    out = []
    col_w = (f.width - _ML) / 3
    for i, (name, _) in enumerate(cleaned):
        colour = PALETTE[i % len(PALETTE)]
        lx = _ML + (i % 3) * col_w
        ly = _MT + f.ph + 34 + (i // 3) * 16
        out.append(
            f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="10" fill="{colour}"/>'
            f'<text x="{lx + 16:.1f}" y="{ly}" fill="#333">{_x(_short(name))}</text>'
        )
    if n_series > MAX_STREAMS:
        out.append(
            f'<text x="{f.width - _MR}" y="{f.total_h - 4}" text-anchor="end" fill="#555">'
            f"{n_series - MAX_STREAMS} more streams not shown</text>"
        )
    return out


def estimates_svg(series: dict[str, list[dict[str, Any]]], width: int = 720, height: int = 240) -> str:
    """An SVG line chart: per stream the mean (polyline) and its 95% CI (shaded band).

    ``series`` maps a stream to ``[{"start": epoch, "mean", "ci_low", "ci_high", "n"}, ...]``;
    ``None`` or non-finite values leave a gap.
    """
    width = max(200, int(width))
    height = max(120, int(height))
    legend_rows = (min(len(series), MAX_STREAMS) + 2) // 3 + (len(series) > MAX_STREAMS)
    total_h = height + 16 * legend_rows  # below the plot: x labels, then a 3-column legend
    cleaned = _clean(series)
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
    f = _frame(cleaned, xs, width, height, total_h)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(cleaned))]
    # Bands first, then lines on top.
    bands = [s for (name, pts), c in zip(cleaned, colours, strict=True) for s in _band(f, name, pts, c)]
    lines = [s for (name, pts), c in zip(cleaned, colours, strict=True) for s in _line(f, name, pts, c)]
    return "".join([head, *_axes(f), *bands, *lines, *_legend(f, cleaned, len(series)), "</svg>"])
