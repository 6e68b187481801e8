"""Command line: ``tcompile optimize MODEL``, ``tcompile report PATH``, ``tcompile passes``, ``tcompile calibrate``.

MODEL is a zoo name (``tcompile.models.names()``), a directory holding a transformers model, or
``module:factory`` (a callable returning an ``nn.Module``, or a ZooModel-like object).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tcompile.errors import ModelNotFoundError, TCompileError


def _load_model(spec: str, batch: int) -> tuple[Any, Any, Any, str, Any]:
    """(model, example inputs, calibration, name, tokenizer or None)."""
    from tcompile.models import load, names
    if spec in names():
        zm = load(spec, batch=batch)
        return zm.model, zm.example_inputs, zm.calibration or None, zm.name, zm.tokenizer
    if Path(spec).is_dir():
        from transformers import AutoModel
        model = AutoModel.from_pretrained(spec, local_files_only=True).eval()
        return model, None, None, Path(spec).name, None
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        obj = getattr(importlib.import_module(mod), attr)
        obj = obj() if callable(obj) else obj
        if hasattr(obj, "model"):
            return (obj.model, getattr(obj, "example_inputs", None), getattr(obj, "calibration", None) or None, attr,
                    getattr(obj, "tokenizer", None))
        return obj, None, None, attr, None
    raise ModelNotFoundError(f"cannot find model {spec!r}: not a zoo name ({', '.join(names())}), "
                             "not a directory, and not module:factory")


def _cmd_optimize(args: argparse.Namespace) -> int:
    import tcompile
    from tcompile.pass_manager import IRDumpInstrument
    model, example, calibration, name, tokenizer = _load_model(args.model, args.batch)
    opt = tcompile.optimize(model, budget=args.budget, example_inputs=example, calibration=calibration,
                            target=args.target, backend=args.backend, passes=args.passes, repeats=args.repeats,
                            name=name, progress=not args.quiet, time_limit=args.time_limit, new_tokens=args.new_tokens,
                            instruments=[IRDumpInstrument(args.dump_ir)] if args.dump_ir else None)
    out = opt.export(args.out) if args.layout == "artifact" else opt.export(args.out, layout=args.layout)
    print(opt.report.summary())
    if hasattr(opt, "generate") and isinstance(example, dict) and "input_ids" in example and tokenizer is not None:
        _show_generation(opt, example["input_ids"][:1], tokenizer)
    if args.layout == "artifact":
        print(f"\nartifact: {out}  (report: {out / 'report.html'}, {out / 'report.json'})")
    else:
        print(f"\nTriton model repository: {out.parent} (model {out.name}; tritonserver --model-repository {out.parent})")
    return 0


def _show_generation(opt: Any, ids: Any, tokenizer: Any) -> None:
    """For a causal LM: answer the zoo's example prompt with the optimized cache, and show its size."""
    from tcompile.runtime.lm_optimize import OptimizedLM
    if not isinstance(opt, OptimizedLM):
        return
    out = opt.generate(ids, max_new_tokens=24)
    s = opt.last_stats
    lines = [ln for ln in tokenizer.decode(ids[0, -60:], skip_special_tokens=True).splitlines() if ln.strip()]
    question = next((ln for ln in reversed(lines) if "?" in ln), lines[-1] if lines else "").strip()
    print(f"\nexample prompt ({s.prompt_tokens} tokens) ends: ...{question!r}")
    print(f"answer: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()!r}")
    print(f"KV cache while decoding: {s.peak_cache_bytes / 2**20:.1f} MiB "
          f"({s.peak_cache_bytes / s.full_cache_bytes:.3f} of the full cache's "
          f"{s.full_cache_bytes / 2**20:.1f} MiB), {s.ms_per_token():.0f} ms/token")


def _cmd_report(args: argparse.Namespace) -> int:
    from tcompile.report import Report
    print(Report.load(args.path).summary())
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from tcompile.registry import available
    info = available()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for name, entry in info.items():
        print(f"{name}{'  (exact)' if entry['exact'] else ''}: {entry['description']}")
        for opt, meta in entry["options"].items():
            print(f"    {opt} = {meta['default']!r}   [{meta['type']}]")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from tcompile.cost import cpu_profile
    profile = cpu_profile(refresh=True)
    print(json.dumps(profile.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcompile", description="Make transformer models touch fewer tokens.")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("optimize", help="optimize a model for a budget, write an artifact and its report")
    o.add_argument("model", help="zoo name, transformers model directory, or module:factory")
    o.add_argument("--budget", default=None, help="e.g. 'flops=0.7' or 'latency=0.5,quality=0.99'")
    o.add_argument("--passes", default=None, help="force a pipeline, e.g. 'token_merging{r=8}'; '' for none")
    o.add_argument("--backend", default="eager", help="eager | inductor | aot | onnxruntime | tensorrt")
    o.add_argument("--layout", default="artifact", choices=["artifact", "triton-server"],
                   help="artifact: for tcompile.load; triton-server: a Triton model repository (onnxruntime/tensorrt)")
    o.add_argument("--target", default="cpu", help="cpu | cuda | h100 | h200 | a100 | l4")
    o.add_argument("--batch", type=int, default=8, help="batch of the example inputs (zoo models)")
    o.add_argument("--repeats", type=int, default=5, help="timed repetitions per latency measurement")
    o.add_argument("--time-limit", type=float, default=600.0, help="seconds the planner may spend (default 600)")
    o.add_argument("--new-tokens", type=int, default=32,
                   help="causal LMs: tokens generated per calibration prompt when measuring a latency budget")
    o.add_argument("--out", required=True, help="artifact directory to write")
    o.add_argument("--dump-ir", default=None, help="write the graph after each changing pass into this directory")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    o.set_defaults(fn=_cmd_optimize)
    r = sub.add_parser("report", help="print the summary of a report.json or an artifact directory")
    r.add_argument("path")
    r.set_defaults(fn=_cmd_report)
    ps = sub.add_parser("passes", help="list registered passes and their options")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=_cmd_passes)
    c = sub.add_parser("calibrate", help="re-measure this machine's CPU profile for the cost model")
    c.set_defaults(fn=_cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "passes", None) == "":
        args.passes = []
    try:
        return args.fn(args)
    except (TCompileError, FileNotFoundError, ValueError) as exc:
        print(f"tcompile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
