"""Render a :class:`~tcompile.report.Report` as GitHub-flavoured Markdown.

Markdown is the form that lands in pull requests, issues and CI job summaries, where HTML and
SVG are stripped, so this renderer carries the same sections as the HTML page as plain tables.
Cell text is escaped so a ``|`` or a newline in a pipeline or note cannot break a table.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from tcompile.report.report import (
    Report, compact_tokens, format_fidelity, format_flops, format_mapping, format_seconds,
    format_value, key_figures, latency_part, lowering_text, number, ratio, speculative_text)


def _cell(x: Any) -> str:
    """One table cell: formatted, single-line, with Markdown-active characters escaped."""
    text = format_value(x) if not isinstance(x, str) else x
    text = " ".join(text.split())  # newlines and runs of spaces would break the row
    for ch in ("\\", "|", "*", "`", "<", ">", "[", "]"):
        text = text.replace(ch, "\\" + ch)
    return text


def _code(x: Any, in_table: bool = True) -> str:
    """Inline code; backticks inside become a lookalike, pipes are escaped inside tables."""
    text = " ".join(str(x).split()).replace("`", "ʼ")
    text = text.replace("|", "\\|") if in_table else text
    return f"`{text}`" if text else ""


def _text(x: Any) -> str:
    """Free text outside a table: escape characters that would start markup."""
    text = str(x)
    for ch in ("\\", "*", "`", "<", ">", "[", "]", "#", "|"):
        text = text.replace(ch, "\\" + ch)
    return text


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           numeric: Sequence[int] = (), raw: Sequence[int] = ()) -> list[str]:
    """A GitHub table; columns in ``raw`` are already Markdown, those in ``numeric`` align right."""
    out = ["| " + " | ".join(_cell(h) for h in headers) + " |",
           "|" + "|".join("---:" if j in numeric else "---" for j in range(len(headers))) + "|"]
    for row in rows:
        cells = [str(v) if j in raw else _cell(v) for j, v in enumerate(row)]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _ratio_text(x: float | None, digits: int = 3) -> str:
    return f"{x:.{digits}f}×" if x is not None else "—"


def _tokens_total(series: Sequence[Any]) -> str:
    vals = [v for v in (number(x) for x in series) if v is not None]
    return f"{sum(vals):g}" if vals else "-"


def render_markdown(report: Report) -> str:
    """The whole report as Markdown: headline figures, then the same sections as the HTML page."""
    r, k = report, key_figures(report)
    md = [f"# tcompile report: {_text(r.model)}", ""]
    md += [f"- **pipeline**: {_code(r.pipeline or '(none)', in_table=False)}"]
    meta = (("backend", r.backend), ("target", r.target), ("budget", format_mapping(r.budget)),
            ("created", r.created), ("outputs", r.output_mode))
    md += [f"- **{n}**: {_text(' '.join(str(v).split()))}" for n, v in meta if v] + [""]

    md += ["## Key figures", ""]
    flops = (f"{format_flops(r.flops.get('baseline'))} → {format_flops(r.flops.get('optimized'))}"
             if r.flops else "not counted")
    speed = (f"{_ratio_text(k['speedup'], 2)} ({k['speedup_source']})"
             if k["speedup"] is not None else "not measured")
    md += _table(["figure", "value", "detail"], [
        ["FLOPs ratio (optimized / baseline)", _ratio_text(k["flops_ratio"]), flops],
        ["speedup (baseline / optimized latency)", speed, ""],
        ["fidelity", format_value(k["fidelity"]) if k["fidelity"] is not None else "not measured",
         format_fidelity(r.fidelity) if r.fidelity else ""]])

    md += ["## Tokens per layer", ""]
    series = {n: v for n, v in r.tokens_per_layer.items() if isinstance(v, (list, tuple)) and v}
    if series:
        names = sorted(series, key=lambda n: (n != "baseline", n != "optimized"))
        depth = max(len(v) for v in series.values())
        md += _table(["layer", *names],
                     [[i, *(series[n][i] if i < len(series[n]) else None for n in names)]
                      for i in range(depth)], numeric=range(len(names) + 1))
        md += [f"- {_text(n)}: {_text(compact_tokens(series[n]))}" for n in names] + [""]
    else:
        md += ["_no per-layer token counts recorded_", ""]

    md += ["## Latency", ""]
    rows = []
    for kind in ("predicted", "measured"):
        lb, lo, extra = latency_part(r, kind)
        if lb is not None or lo is not None or extra:
            s = ratio(lb, lo)
            rows.append([kind, format_seconds(lb), format_seconds(lo),
                         _ratio_text(s, 2) if s is not None else "-", format_mapping(extra)])
    md += (_table(["", "baseline", "optimized", "speedup", "details"], rows, numeric=(1, 2, 3))
           if rows else ["_no latency predicted or measured_", ""])

    if speculative_text(r):
        md += [f"- speculative decoding: {_text(speculative_text(r))}", ""]
    parts = r.latency.get("parts") if isinstance(r.latency, dict) else None
    if parts:
        md += ["## Predicted vs measured, per block / phase (optimized)", ""]
        md += _table(["part", "predicted", "measured", "predicted / measured"],
                     [[p.get("part"), format_seconds(p.get("predicted_s")), format_seconds(p.get("measured_s")),
                       _ratio_text(ratio(p.get("predicted_s"), p.get("measured_s")), 2)] for p in parts],
                     numeric=(1, 2, 3))

    md += ["## Passes", ""]
    rows = [[i + 1, _code(p.spec or p.name), f"**{_cell(p.status)}**", p.exact,
             format_seconds(p.seconds),
             f"{_tokens_total(p.tokens_before)} → {_tokens_total(p.tokens_after)}"
             if p.tokens_before or p.tokens_after else "-",
             f"{format_flops(p.flops_before)} → {format_flops(p.flops_after)}"
             if p.flops_before is not None or p.flops_after is not None else "-",
             p.fidelity, p.max_abs_error, format_mapping(p.stats), p.reason or ""]
            for i, p in enumerate(r.passes)]
    md += (_table(["#", "pass", "status", "exact", "time", "Σ tokens", "FLOPs", "fidelity",
                   "max abs err", "stats", "reason"], rows, numeric=(0, 4), raw=(1, 2))
           if rows else ["_no passes recorded_", ""])

    if r.candidates:
        md += ["## Candidates: cost vs quality", "",
               "Ratios are optimized / baseline; **chosen** marks the plan that was compiled.", ""]
        rows = [[i + 1, "**chosen**" if c.chosen else "", _code(c.pipeline), c.flops_ratio,
                 c.predicted_latency_ratio, c.measured_latency_ratio, c.fidelity, c.note]
                for i, c in enumerate(r.candidates)]
        md += _table(["#", "", "pipeline", "FLOPs ratio", "pred. latency ratio",
                      "meas. latency ratio", "fidelity", "note"], rows,
                     numeric=(0, 3, 4, 5, 6), raw=(1, 2))

    if r.lowering:
        md += ["## Lowering", "", f"- {_text(lowering_text(r.lowering))}", ""]

    md += ["## Where the time goes (torch.profiler, optimized model)", ""]
    md += (_table(["op", "calls", "self time (ms)", "share"],
                  [[_code(o.get("op")), o.get("calls"), o.get("self_ms"), f"{100 * (o.get('share') or 0):.1f}%"]
                   for o in r.op_profile], numeric=(1, 2, 3), raw=(0,))
           if r.op_profile else ["_not profiled_", ""])

    for title, mapping in (("Device", r.device), ("Versions", r.versions)):
        md += [f"## {title}", ""]
        md += (_table(["key", "value"], [[str(n), v] for n, v in mapping.items()])
               if mapping else [f"_no {title.lower()} recorded_", ""])

    if r.notes:
        md += ["## Notes", ""] + [f"- {_text(' '.join(str(n).split()))}" for n in r.notes] + [""]
    return "\n".join(md).rstrip("\n") + "\n"
