"""Render a :class:`~tcompile.report.Report` as one self-contained HTML page.

Reports get mailed, attached to tickets and opened on air-gapped machines, so the page carries
everything inline: CSS in a ``<style>`` block and charts as SVG drawn here in Python. There is no
JavaScript and no external URL of any kind. Every string from the report is escaped, since
model names and notes come from users. Missing data gives a short "no data" line, never an error.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Mapping, Sequence

from tcompile.report.report import (
    CandidateRecord, Report, compact_tokens, format_fidelity, format_flops, format_mapping,
    format_seconds, format_value, key_figures, latency_part, number, ratio, speculative_text)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:960px;padding:0 1rem;color:#1d2330;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.25rem}
h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde1e8;padding-bottom:.2rem}
code{background:#f2f4f7;padding:.05rem .3rem;border-radius:3px;font-size:.9em}
.meta{color:#4a5263;font-size:.92rem}.meta span{margin-right:1.2rem}
.figures{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.fig{flex:1 1 180px;border:1px solid #dde1e8;border-radius:8px;padding:.7rem 1rem;
background:#fafbfc}
.fig .v{font-size:1.7rem;font-weight:600}
.fig .l{font-size:.8rem;color:#4a5263;text-transform:uppercase}
.fig .s{font-size:.85rem;color:#4a5263}
table{border-collapse:collapse;font-size:.88rem;margin:.5rem 0;width:100%}
th,td{border-bottom:1px solid #e6e9ef;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.applied{color:#17803d;font-weight:600}.skipped{color:#a15c00;font-weight:600}
tr.chosen td{background:#fff4e0}.nodata{color:#7a8294;font-style:italic}
svg text{font-family:inherit;font-size:11px;fill:#1d2330}svg .axis{stroke:#8a93a6}
svg .grid{stroke:#eceef2}
"""
_SERIES_COLORS = ["#b3bac8", "#1f6fd1", "#e07b00", "#2a9d55", "#b03aa8", "#c23b3b"]
_W, _H, _ML, _MR, _MT, _MB = 720, 300, 64, 20, 34, 46


class _Raw(str):
    """Markup already escaped; table cells of this type are inserted as is."""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def _frame(chart_id: str, label: str, xs: tuple[float, float], ys: tuple[float, float],
           xticks: Iterable[tuple[float, str]], xlabel: str,
           ylabel: str) -> tuple[list[str], Any, Any]:
    """Open an SVG with grid, axes and tick labels; return its parts and the x/y scale functions."""
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def sx(x: float) -> float:
        return _ML + (x - xs[0]) / ((xs[1] - xs[0]) or 1) * pw

    def sy(y: float) -> float:
        return _MT + ph - (y - ys[0]) / ((ys[1] - ys[0]) or 1) * ph

    out = [f'<svg id="{_e(chart_id)}" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
           f'role="img" aria-label="{_e(label)}" style="max-width:100%;height:auto">',
           f"<title>{_e(label)}</title>"]
    for t in nice_ticks(ys[0], ys[1]):
        out.append(f'<line class="grid" x1="{_ML}" x2="{_W - _MR}" y1="{sy(t):.1f}" '
                   f'y2="{sy(t):.1f}"/><text x="{_ML - 6}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for x, text in xticks:
        out.append(f'<line class="axis" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{_MT + ph}" '
                   f'y2="{_MT + ph + 4}"/><text x="{sx(x):.1f}" y="{_MT + ph + 16}" '
                   f'text-anchor="middle">{_e(text)}</text>')
    out.append(f'<line class="axis" x1="{_ML}" x2="{_W - _MR}" y1="{_MT + ph}" '
               f'y2="{_MT + ph}"/><line class="axis" x1="{_ML}" x2="{_ML}" y1="{_MT}" '
               f'y2="{_MT + ph}"/><text x="{_ML + pw / 2:.1f}" y="{_H - 8}" '
               f'text-anchor="middle">{_e(xlabel)}</text>'
               f'<text transform="translate(14,{_MT + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    return out, sx, sy


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    parts, x = [], _W - _MR
    for name, color in reversed(entries):
        x -= 22 + 7 * len(name)
        parts.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{color}"/>'
                     f'<text x="{x + 16}" y="18">{_e(name)}</text>')
    return "".join(parts)


def tokens_chart(series: Mapping[str, Sequence[Any]]) -> str:
    """Step chart of tokens entering each attention layer, one line per series; '' when empty."""
    data = {str(k): [number(v) for v in vals] for k, vals in (series or {}).items()
            if isinstance(vals, (list, tuple)) and any(number(v) is not None for v in vals)}
    if not data:
        return ""
    names = sorted(data, key=lambda k: (k != "baseline", k != "optimized"))
    n = max(len(v) for v in data.values())
    top = max(v for vals in data.values() for v in vals if v is not None) or 1.0
    yt = nice_ticks(0, top)
    step = yt[1] - yt[0] if len(yt) > 1 else top
    ymax = math.ceil(top * 1.04 / step) * step  # headroom so the top line clears the frame
    every = max(1, math.ceil(n / 16))
    xticks = [(i + 0.5, str(i)) for i in range(0, n, every)]
    out, sx, sy = _frame("chart-tokens", "Tokens per layer", (0, n), (0, ymax), xticks,
                         "attention layer", "tokens")
    colors = {}
    for j, name in enumerate(names):
        color = colors[name] = _SERIES_COLORS[j % len(_SERIES_COLORS)]
        vals = data[name]  # one horizontal step per layer; a None lifts the pen
        d = "".join(f"{'L' if i and vals[i - 1] is not None else 'M'}{sx(i):.1f},{sy(v):.1f}"
                    f"L{sx(i + 1):.1f},{sy(v):.1f}" for i, v in enumerate(vals) if v is not None)
        width = 4.5 if name == "baseline" else 2.2  # wide underlay stays visible where lines meet
        out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{width}"/>')
        for i, v in enumerate(vals):
            if v is not None:
                out.append(f'<circle cx="{sx(i + 0.5):.1f}" cy="{sy(v):.1f}" r="3" fill="{color}">'
                           f"<title>{_e(f'{name}, layer {i}: {v:g} tokens')}</title></circle>")
    out.append(_legend([(k, colors[k]) for k in names]) + "</svg>")
    return "\n".join(out)


_Point = tuple[int, float, float]  # (candidate index, cost, fidelity)


def _candidate_points(cands: Sequence[CandidateRecord]) -> tuple[str, list[_Point]]:
    """Pick the x quantity that plots the most candidates (measured > predicted > FLOPs on ties)."""
    best: tuple[str, list[_Point]] = ("", [])
    for attr in ("measured_latency_ratio", "predicted_latency_ratio", "flops_ratio"):
        raw = [(i, number(getattr(c, attr)), number(c.fidelity)) for i, c in enumerate(cands)]
        pts = [(i, x, y) for i, x, y in raw
               if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
        if len(pts) > len(best[1]):
            best = (attr, pts)
    return best


def pareto_front(points: Sequence[_Point]) -> list[_Point]:
    """Points not beaten by another with lower-or-equal cost and higher fidelity, by cost."""
    front: list[_Point] = []
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if not front or p[2] > front[-1][2]:
            front.append(p)
    return front


def pareto_chart(cands: Sequence[CandidateRecord]) -> str:
    """Scatter of candidate plans, cost (x) against fidelity (y); '' when nothing is plottable."""
    attr, pts = _candidate_points(cands)
    if not pts:
        return ""
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    xpad, ypad = (max(xs) - min(xs)) * 0.08 or 0.05, (max(ys) - min(ys)) * 0.1 or 0.005
    xlo, xhi, ylo, yhi = min(xs) - xpad, max(xs) + xpad, min(ys) - ypad, max(ys) + ypad
    xticks = [(t, f"{t:g}") for t in nice_ticks(xlo, xhi, 6)]
    label = attr.replace("_", " ").replace("ratio", "ratio (optimized / baseline)")
    out, sx, sy = _frame("chart-pareto", "Cost vs quality", (xlo, xhi), (ylo, yhi), xticks,
                         label, "fidelity")
    if xlo < 1.0 < xhi:
        out.append(f'<line x1="{sx(1):.1f}" x2="{sx(1):.1f}" y1="{_MT}" y2="{_H - _MB}" '
                   f'stroke="#8a93a6" stroke-dasharray="2,3"/><text x="{sx(1) + 3:.1f}" '
                   f'y="{_MT + 10}">baseline</text>')
    front = pareto_front(pts)
    if len(front) > 1:
        line = " ".join(f"{sx(p[1]):.1f},{sy(p[2]):.1f}" for p in front)
        out.append(f'<polyline points="{line}" fill="none" stroke="#2a9d55" stroke-width="1.5" '
                   f'stroke-dasharray="5,3"/>')
    on_front = {p[0] for p in front}
    for i, x, y in pts:
        c = cands[i]
        fill = "#e07b00" if c.chosen else ("#2a9d55" if i in on_front else "#8a93a6")
        tip = f"#{i + 1} {c.pipeline}: x={x:.4g}, fidelity={y:.4g}" + " (chosen)" * c.chosen
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{7 if c.chosen else 4.5}" '
                   f'fill="{fill}" stroke="#1d2330" stroke-width="{1.5 if c.chosen else 0.5}">'
                   f"<title>{_e(tip)}</title></circle>")
        right = sx(x) > _W - _MR - 70  # labels near the right edge go to the left of the point
        out.append(f'<text x="{sx(x) + (-9 if right else 9):.1f}" y="{sy(y) - 6:.1f}" '
                   f'text-anchor="{"end" if right else "start"}">'
                   f"{_e(f'#{i + 1}' + (' chosen' if c.chosen else ''))}</text>")
    out.append(_legend([("chosen", "#e07b00"), ("Pareto front", "#2a9d55"),
                        ("other", "#8a93a6")]))
    return "\n".join(out) + "</svg>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "",
           row_classes: Sequence[str] = (), numeric: Sequence[int] = ()) -> str:
    tid = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    out = [f"<table{tid}><thead><tr>{head}</tr></thead><tbody>"]
    for r, row in enumerate(rows):
        cls = f' class="{_e(row_classes[r])}"' if r < len(row_classes) and row_classes[r] else ""
        cells = "".join(("<td class=\"n\">" if j in numeric else "<td>")
                        + (v if isinstance(v, _Raw) else _e(format_value(v))) + "</td>"
                        for j, v in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    return "\n".join(out) + "</tbody></table>"


def _nodata(text: str) -> str:
    return f'<p class="nodata">{_e(text)}</p>'


def _figure(label: str, value: str, sub: str) -> str:
    return (f'<div class="fig"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div>'
            f'<div class="s">{_e(sub)}</div></div>')


def _times(x: float | None, digits: int) -> str:
    return f"{x:.{digits}f}×" if x is not None else "—"


def _code(x: Any) -> _Raw:
    return _Raw(f"<code>{_e(x)}</code>")


def _pass_rows(report: Report) -> list[list[Any]]:
    rows = []
    for i, p in enumerate(report.passes):
        tip = f"{compact_tokens(p.tokens_before)} → {compact_tokens(p.tokens_after)}"
        before, after = (f"{sum(v for v in map(number, t) if v is not None):g}" if t else "-"
                         for t in (p.tokens_before, p.tokens_after))
        tokens = _Raw(f'<span title="{_e(tip)}">{_e(before)} → {_e(after)}</span>')
        flops = f"{format_flops(p.flops_before)} → {format_flops(p.flops_after)}"
        rows.append([i + 1, _code(p.spec or p.name),
                     _Raw(f'<span class="{_e(p.status)}">{_e(p.status)}</span>'), p.exact,
                     format_seconds(p.seconds),
                     tokens if p.tokens_before or p.tokens_after else "-",
                     "-" if p.flops_before is None and p.flops_after is None else flops,
                     p.fidelity, p.max_abs_error, format_mapping(p.stats), p.reason or ""])
    return rows


def render_html(report: Report) -> str:
    """The whole report as one HTML page with inline CSS and SVG, no scripts or external URLs."""
    r, k = report, key_figures(report)
    meta = [("backend", r.backend), ("target", r.target), ("budget", format_mapping(r.budget)),
            ("created", r.created), ("outputs", r.output_mode)]
    spans = "".join(f"<span>{_e(n)}: <b>{_e(v)}</b></span>" for n, v in meta if v)
    b = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width,initial-scale=1">'
         f"<title>tcompile report: {_e(r.model)}</title><style>{_CSS}</style></head><body>",
         f"<h1>tcompile report: {_e(r.model)}</h1>",
         f'<p class="meta">pipeline <code>{_e(r.pipeline or "(none)")}</code></p>',
         f'<p class="meta">{spans}</p>']
    flops = (f"{format_flops(r.flops.get('baseline'))} → {format_flops(r.flops.get('optimized'))}"
             if r.flops else "not counted")
    measured = k["speedup"] is not None
    b.append('<div class="figures" id="key-figures">'
             + _figure("FLOPs ratio", _times(k["flops_ratio"], 3), flops)
             + _figure(f"speedup ({k['speedup_source'] or 'latency'})", _times(k["speedup"], 2),
                       "baseline / optimized latency" if measured else "not measured")
             + _figure("fidelity", "—" if k["fidelity"] is None else format_value(k["fidelity"]),
                       format_fidelity(r.fidelity) if r.fidelity else "not measured") + "</div>")
    b.append("<h2>Tokens per layer</h2>")
    b.append(tokens_chart(r.tokens_per_layer) or _nodata("no per-layer token counts recorded"))
    b.append("<h2>Latency</h2>")
    rows = []
    for kind in ("predicted", "measured"):
        lb, lo, extra = latency_part(r, kind)
        if lb is not None or lo is not None or extra:
            rows.append([kind, format_seconds(lb), format_seconds(lo),
                         _times(ratio(lb, lo), 2), format_mapping(extra)])
    b.append(_table(["", "baseline", "optimized", "speedup", "details"], rows, "latency-table",
                    numeric=(1, 2, 3)) if rows else _nodata("no latency predicted or measured"))
    if speculative_text(r):
        b.append(f'<p class="meta" id="speculative">speculative decoding: {_e(speculative_text(r))}</p>')
    parts = r.latency.get("parts") if isinstance(r.latency, dict) else None
    if parts:
        b.append("<h2>Predicted vs measured, per block / phase (optimized)</h2>")
        b.append(_table(["part", "predicted", "measured", "predicted / measured"],
                        [[p.get("part"), format_seconds(p.get("predicted_s")), format_seconds(p.get("measured_s")),
                          _times(ratio(p.get("predicted_s"), p.get("measured_s")), 2)] for p in parts],
                        "parts-table", numeric=(1, 2, 3)))
    b.append("<h2>Passes</h2>")
    rows = _pass_rows(r)
    b.append(_table(["#", "pass", "status", "exact", "time", "Σ tokens", "FLOPs", "fidelity",
                     "max abs err", "stats", "reason"], rows, "passes-table", numeric=(0,))
             if rows else _nodata("no passes recorded"))
    if r.candidates:
        b.append("<h2>Candidates: cost vs quality</h2>")
        b.append(pareto_chart(r.candidates)
                 or _nodata("no candidate has both a cost and a fidelity to plot"))
        rows = [[i + 1, _Raw("<b>✔ chosen</b>") if c.chosen else "", _code(c.pipeline),
                 c.flops_ratio, c.predicted_latency_ratio, c.measured_latency_ratio, c.fidelity,
                 c.note] for i, c in enumerate(r.candidates)]
        b.append(_table(["#", "", "pipeline", "FLOPs ratio", "pred. latency ratio",
                         "meas. latency ratio", "fidelity", "note"], rows, "candidates-table",
                        ["chosen" if c.chosen else "" for c in r.candidates], (0, 3, 4, 5, 6)))
    b.append("<h2>Where the time goes (torch.profiler, optimized model)</h2>")
    b.append(_table(["op", "calls", "self time (ms)", "share"],
                    [[_code(o.get("op")), o.get("calls"), o.get("self_ms"), f"{100 * (o.get('share') or 0):.1f}%"]
                     for o in r.op_profile], "op-profile-table", numeric=(1, 2, 3))
             if r.op_profile else _nodata("not profiled"))
    for title, mapping in (("Device", r.device), ("Versions", r.versions)):
        rows = [[str(n), v] for n, v in mapping.items()]
        b.append(f"<h2>{title}</h2>" + (_table(["key", "value"], rows, f"{title.lower()}-table")
                                        if rows else _nodata(f"no {title.lower()} recorded")))
    if r.notes:
        b.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in r.notes) + "</ul>")
    return "\n".join(b) + "\n</body></html>\n"
