"""The Report object: what the compiler did to a model, and what it bought.

Every front end (CLI, Python API, exported artifact) produces this one record, so it is plain data
that round-trips exactly through JSON. The formatting helpers here are shared by the HTML and
Markdown renderers so numbers read the same everywhere. Any part may be missing (a planner-only
run has no measurement, a skipped pass no token counts), and nothing here may crash on that.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any, Mapping

SAVE_SUFFIXES: tuple[str, ...] = (".json", ".md", ".html", ".htm")


@dataclass
class PassRecord:
    """One pass of the pipeline as it ran: applied or skipped, its cost and its effect."""
    name: str
    spec: str
    status: str
    reason: str | None = None
    exact: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    tokens_before: list[int] = field(default_factory=list)
    tokens_after: list[int] = field(default_factory=list)
    flops_before: float | None = None
    flops_after: float | None = None
    fidelity: float | None = None
    max_abs_error: float | None = None


@dataclass
class CandidateRecord:
    """A plan the planner considered, with its predicted/measured figures and the verdict."""
    pipeline: str
    flops_ratio: float | None = None
    predicted_latency_ratio: float | None = None
    measured_latency_ratio: float | None = None
    fidelity: float | None = None
    chosen: bool = False
    note: str = ""


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, ignoring unknown keys, with a clear error."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class Report:
    """Everything about one compilation: pipeline, passes, tokens, FLOPs, latency, fidelity."""
    model: str
    pipeline: str
    target: str = "cpu"
    backend: str = "eager"
    budget: dict[str, float] | None = None
    passes: list[PassRecord] = field(default_factory=list)
    tokens_per_layer: dict[str, list[int]] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    output_mode: str | None = None
    candidates: list[CandidateRecord] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # backend capability: ops run in the engine, fallbacks (outside it), unsupported, partitions
    lowering: dict[str, Any] = field(default_factory=dict)
    # torch.profiler's top ops of one optimized run: {"op", "calls", "self_ms", "share"}
    op_profile: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # a JSON null where a container belongs reads as empty
            if getattr(self, f.name) is None and f.default_factory is not MISSING:
                setattr(self, f.name, f.default_factory())
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # a deep copy, plain JSON types

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output (unknown keys are ignored)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a report must be a JSON object, got {type(d).__name__}")
        data = json.loads(json.dumps(dict(d), default=_json_default))  # deep copy, JSON types only
        data["passes"] = [_build(PassRecord, p, f"passes[{i}]")
                          for i, p in enumerate(data.get("passes") or [])]
        data["candidates"] = [_build(CandidateRecord, c, f"candidates[{i}]")
                              for i, c in enumerate(data.get("candidates") or [])]
        return _build(cls, data, "report")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, Markdown or HTML by suffix; atomic, creating parent dirs."""
        p, suffix = Path(path), Path(path).suffix.lower()
        if suffix not in SAVE_SUFFIXES:
            raise ValueError(f"cannot save a report as {p.name!r}: unsupported suffix "
                             f"{suffix or '(none)'!r}; use one of {', '.join(SAVE_SUFFIXES)}")
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"
        else:  # imported here: the renderers import this module
            from tcompile.report.html import render_html
            from tcompile.report.markdown import render_markdown
            text = render_markdown(self) if suffix == ".md" else render_html(self)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:  # open() rather than mkstemp so the file gets the usual umask permissions
            with open(tmp, "x", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)  # readers see the old file or the whole new one, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a ``.json`` report, or the ``report.json`` inside an exported artifact directory."""
        p = Path(path)
        if p.is_dir():
            if not (p / "report.json").is_file():
                raise FileNotFoundError(f"{p} is a directory but holds no report.json; pass a "
                                        f"report .json file or an exported artifact directory")
            p = p / "report.json"
        elif not p.exists():
            raise FileNotFoundError(f"no report at {p}")
        elif p.suffix.lower() != ".json":
            raise ValueError(f"cannot load {p.name!r}: only .json reports (or artifact directories "
                             f"holding report.json) can be loaded; .md/.html are renderings")
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p} is not a valid JSON report: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None

    def summary(self) -> str:
        """A compact plain-text summary for a terminal; absent parts are left out."""
        out = [f"tcompile report: {self.model}", f"  pipeline : {self.pipeline or '(none)'}",
               f"  backend  : {self.backend} on {self.target}"]
        if self.budget:
            out.append(f"  budget   : {format_mapping(self.budget)}")
        base, opt = number(self.flops.get("baseline")), number(self.flops.get("optimized"))
        if base is not None or opt is not None:
            line = f"  FLOPs    : {format_flops(base)} -> {format_flops(opt)}"
            r = ratio(opt, base)
            out.append(line + (f"  ({r:.3f}x)" if r is not None else ""))
        for kind in ("predicted", "measured"):
            b, o, extra = latency_part(self, kind)
            if b is None and o is None and not extra:
                continue
            s = ratio(b, o)
            line = f"  latency  : {kind:<9} {format_seconds(b)} -> {format_seconds(o)}"
            line += f"  speedup {s:.2f}x" if s is not None else ""
            out.append(line + (f"  ({format_mapping(extra)})" if extra else ""))
        if self.fidelity:
            out.append(f"  fidelity : {format_fidelity(self.fidelity)}")
        if speculative_text(self):
            out.append(f"  drafting : {speculative_text(self)}")
        if self.output_mode:
            out.append(f"  outputs  : {self.output_mode}")
        for name, series in self.tokens_per_layer.items():
            out.append(f"  tokens   : {name:<9} {compact_tokens(series)}")
        if self.passes:
            out.append("passes:")
        for p in self.passes:
            line = f"  [{p.status}] {p.spec or p.name}  {format_value(p.seconds)} s"
            measured = (("fidelity", p.fidelity), ("max_abs_err", p.max_abs_error))
            parts = ["exact"] * bool(p.exact) + [format_mapping(p.stats, limit=6)] + [
                f"{k}={format_value(v)}" for k, v in measured if v is not None]
            line += "".join(f"  {x}" for x in parts if x)
            out.append(line + (f"  -- {p.reason}" if p.reason else ""))
        if self.op_profile:
            top = ", ".join(f"{o.get('op')} {100 * (o.get('share') or 0):.0f}%" for o in self.op_profile[:3])
            out.append(f"  top ops  : {top}")
        if self.candidates:
            out.append("candidates:  (* = chosen; ratios are optimized/baseline)")
            out.append(f"    {'flops':>7} {'pred':>7} {'meas':>7} {'fid':>7}  pipeline")
            for c in self.candidates:
                nums = " ".join(f"{format_value(v):>7}" for v in (
                    c.flops_ratio, c.predicted_latency_ratio, c.measured_latency_ratio, c.fidelity))
                note = f"  ({c.note})" if c.note else ""
                out.append(f"  {'*' if c.chosen else ' '} {nums}  {c.pipeline}{note}")
        if self.lowering:
            out.append(f"lowering: {lowering_text(self.lowering)}")
        if self.device:
            out.append(f"device: {format_mapping(self.device, limit=6)}")
        if self.notes:
            out.append("notes:")
            out.extend(f"  - {n}" for n in self.notes)
        return "\n".join(out)


# -------------------------------------------------------------------- shared formatting helpers
def _json_default(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else str(obj)


def number(x: Any) -> float | None:
    """``x`` as a float when it is a real number (not bool), else None."""
    return None if isinstance(x, bool) or not isinstance(x, (int, float)) else float(x)


def ratio(num: Any, den: Any) -> float | None:
    """``num / den`` when both are finite numbers and ``den`` is non-zero."""
    a, b = number(num), number(den)
    ok = a is not None and b is not None and b != 0 and math.isfinite(a) and math.isfinite(b)
    return a / b if ok else None  # type: ignore[operator]


def format_value(x: Any) -> str:
    """A short human form of a scalar: 4 significant digits for floats, '-' for None."""
    if x is None or isinstance(x, bool):
        return "-" if x is None else "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return compact_tokens(list(x)) if all(isinstance(v, int) for v in x) else str(list(x))
    return str(x)


def format_mapping(m: Mapping[str, Any] | None, limit: int | None = None) -> str:
    """``k=v, k=v`` with at most ``limit`` entries (the rest counted)."""
    items = list(m.items()) if m else []
    shown = items if limit is None else items[:limit]
    text = ", ".join(f"{k}={format_value(v)}" for k, v in shown)
    return text + (f", +{len(items) - len(shown)} more" if len(shown) < len(items) else "")


def format_flops(x: Any) -> str:
    """``1.23 GFLOP``; '-' when absent."""
    v = number(x)
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if v is not None and abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return "-" if v is None else f"{v:.3g} FLOP"


def format_seconds(x: Any) -> str:
    """``12.3 ms``; '-' when absent."""
    v = number(x)
    if v is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "µs")):
        if abs(v) * scale >= 1 or v == 0:
            break
    return f"{v * scale:.3g} {unit}"


def format_fidelity(fid: Mapping[str, Any] | None) -> str:
    """``cosine 0.9912 (n=200)`` from the report's fidelity mapping."""
    if not isinstance(fid, Mapping) or not fid:
        return "-"
    rest = format_mapping({k: v for k, v in fid.items() if k not in ("metric", "value")})
    return f"{fid.get('metric', 'fidelity')} {format_value(fid.get('value'))}" + (
        f" ({rest})" if rest else "")


def compact_tokens(series: list[Any] | None) -> str:
    """Run-length form of per-layer token counts: ``197x4, 133x4, 69x4``."""
    if not series or not isinstance(series, (list, tuple)):
        return "-" if not series else str(series)
    runs = [(v, len(list(g))) for v, g in groupby(series)]
    return ", ".join(f"{v}x{n}" if n > 1 else f"{v}" for v, n in runs)


def speculative_text(report: Report) -> str:
    """The speculative loop's figures of the last generation (acceptance rate, mean accepted
    length, tokens/s), or "" without speculation."""
    spec = report.latency.get("speculative") if isinstance(report.latency, Mapping) else None
    if not isinstance(spec, Mapping):
        return ""
    parts = [f"{spec.get('drafter', '')} drafter".strip(),
             f"acceptance rate {format_value(spec.get('acceptance_rate'))}",
             f"mean accepted length {format_value(spec.get('mean_accepted_length'))}",
             f"{format_value(spec.get('tokens_per_s'))} tokens/s"]
    if number(spec.get("step_ms")) is not None:
        parts.append(f"{format_value(spec.get('step_ms'))} ms per step (verify {format_value(spec.get('verify_ms'))}, "
                     f"draft {format_value(spec.get('draft_ms'))}, other {format_value(spec.get('other_ms'))})")
    return ", ".join(parts)


def latency_part(report: Report, kind: str) -> tuple[float | None, float | None, dict]:
    """(baseline s, optimized s, other keys such as repeats/batch) of ``latency[kind]``."""
    lat = report.latency.get(kind) if isinstance(report.latency, Mapping) else None
    if not isinstance(lat, Mapping):
        return None, None, {}
    extra = {k: v for k, v in lat.items() if k not in ("baseline", "optimized")}
    return number(lat.get("baseline")), number(lat.get("optimized")), extra


def key_figures(report: Report) -> dict[str, Any]:
    """Headline figures: FLOPs ratio, speedup (measured, else predicted) and source, fidelity."""
    fid = report.fidelity if isinstance(report.fidelity, Mapping) else {}
    figs: dict[str, Any] = {
        "flops_ratio": ratio(report.flops.get("optimized"), report.flops.get("baseline")),
        "speedup": None, "speedup_source": None, "fidelity": number(fid.get("value")),
        "fidelity_metric": fid.get("metric", "fidelity") if fid else None}
    for kind in ("measured", "predicted"):
        s = ratio(*latency_part(report, kind)[:2])
        if s is not None:
            return {**figs, "speedup": s, "speedup_source": kind}
    return figs


def lowering_text(lowering: dict[str, Any]) -> str:
    """One line: engine partitions, and the ops run outside the engine (or refused)."""
    text = (f"{lowering.get('backend', '?')}: {lowering.get('engine_ops', 0)} ops in "
            f"{lowering.get('partitions', 0)} engine partition(s)")
    if lowering.get("fallbacks"):
        text += f"; fallbacks (run in PyTorch): {', '.join(lowering['fallbacks'])}"
    else:
        text += "; no fallbacks"
    if lowering.get("unsupported"):
        text += f"; unsupported: {', '.join(lowering['unsupported'])}"
    return text
