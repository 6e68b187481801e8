"""Backends on this CPU: the eager rewritten graph vs inductor, aot and onnxruntime, equal outputs and speed.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/lowering_speed.py [--part vit minilm lm] [--r 16]
       [--rounds 7] [--lm-rounds 3] [--new-tokens 32] [--backends eager inductor aot onnxruntime]

* vit: ViT-B/16 (random weights), 224x224, batch 8, ``token_merging{r=16}``: max |logits - eager|
  at batch 8, then every backend timed in interleaved rounds; ratio of medians over eager.
* minilm: all-MiniLM-L6-v2 on 8 pydoc sentences (max 64 tokens, padded), the pipeline the FLOPs
  planner chose in bench/minilm_budget.py: max |last_hidden_state - eager| over real tokens per
  backend (equality only; padding positions reported apart: their merge order is a tie).
* lm: SmolLM2-135M-Instruct, full cache, greedy: a ~200-token pydoc prompt, ``--new-tokens`` new
  tokens; tokens must equal eager's; decode ms/token = median step time of one generation, the
  figure per backend is the median over interleaved rounds; tokens/s = 1000 / ms.

Building (capture, compile, export) holds /tmp/tcompile_bench.lock shared and every timed section
holds it exclusively (flock(2), the lock flock(1) takes), so builds overlap with others' tests but
timings never do. Results are merged into bench/results/lowering_speed.json, one key per part.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import statistics
import time
from typing import Any, Iterator

import torch

import tcompile
from bench_common import RESULTS, interleaved_medians, machine
from tcompile.runtime.lm_lowering import attach_engines

LOCK = "/tmp/tcompile_bench.lock"
BACKENDS = ["eager", "inductor", "aot", "onnxruntime"]
MINILM_PIPE = "token_merging{layers=[7,6,6,6,6,6],metric=hidden}"


@contextlib.contextmanager
def locked(exclusive: bool) -> Iterator[None]:
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(model: torch.nn.Module, pipe: Any, inputs: dict, backends: list[str]) -> dict[str, Any]:
    """optimize() per backend; one call each so JIT compiles (inductor) happen here, not in timing."""
    opts, build_s = {}, {}
    for backend in backends:
        started = time.perf_counter()
        opts[backend] = tcompile.optimize(model, passes=pipe, example_inputs=inputs, backend=backend, measure=False)
        with torch.no_grad():
            opts[backend](**inputs)
        build_s[backend] = time.perf_counter() - started
        print(f"  built {backend} in {build_s[backend]:.0f} s", flush=True)
    return {"opts": opts, "build_s": build_s}


def part_vit(args: argparse.Namespace) -> dict[str, Any]:
    from tcompile.models.vision import vit_b16
    pipe = f"token_merging{{r={args.r}}}"
    x8 = {"pixel_values": torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    with locked(False):
        built = _build(vit_b16(), pipe, x8, args.backends)
        opts = built["opts"]
        with torch.no_grad():
            ref = opts["eager"](**x8).logits
            diff = {b: (o(**x8).logits - ref).abs().max().item() for b, o in opts.items()}
    print(f"  max |logits - eager| at batch 8: {diff}", flush=True)
    with locked(True):
        med = interleaved_medians({b: (lambda o=o: o(**x8)) for b, o in opts.items()}, args.rounds)
    base = med["eager"]["median"]
    rows = {b: {"median_s": m["median"], "speedup_over_eager": base / m["median"], "times": m["times"],
                "max_abs_diff": diff[b], "build_s": built["build_s"][b],
                "lowering": opts[b].report.lowering} for b, m in med.items()}
    for b, r in rows.items():
        print(f"  | {b} | {r['median_s']:.3f} s | {r['speedup_over_eager']:.2f}x | {r['max_abs_diff']:.1e} |")
    return {"pipeline": pipe, "batch": 8, "rounds": args.rounds, "rows": rows}


def part_minilm(args: argparse.Namespace) -> dict[str, Any]:
    from tcompile.models.data import pydoc_sentences
    from tcompile.models.text import encode, load_minilm, load_minilm_tokenizer
    model, tok = load_minilm(), load_minilm_tokenizer()
    inputs = encode(tok, pydoc_sentences(8), max_length=64)
    with locked(False):
        opts = _build(model, MINILM_PIPE, dict(inputs), args.backends)["opts"]
        real = inputs["attention_mask"].bool()[:, :, None]
        with torch.no_grad():
            ref = opts["eager"](**inputs).last_hidden_state
            got = {b: o(**inputs).last_hidden_state for b, o in opts.items()}
    # Padding positions carry no meaning (mean pooling drops them); which pads merge first is a
    # tie that torch's argsort and ONNX TopK break differently, so they are reported apart.
    diff = {b: ((g - ref).abs() * real).max().item() for b, g in got.items()}
    diff_all = {b: (g - ref).abs().max().item() for b, g in got.items()}
    print(f"  max |last_hidden_state - eager| over real tokens: {diff}; over all positions: {diff_all}", flush=True)
    return {"pipeline": MINILM_PIPE, "batch": 8, "seq": int(inputs["input_ids"].shape[1]),
            "padded_rows": int((inputs["attention_mask"] == 0).any(1).sum()), "max_abs_diff": diff,
            "max_abs_diff_incl_padding": diff_all}


def part_lm(args: argparse.Namespace) -> dict[str, Any]:
    from pydoc_data.topics import topics

    from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    text = topics["assert"][:900]
    ids = tok(text, return_tensors="pt").input_ids
    opts, build_s = {}, {}
    with locked(False):
        for b in args.backends:
            started = time.perf_counter()
            opts[b] = tcompile.optimize(model, passes=[], backend=b)
            opts[b].generate(ids, max_new_tokens=2)      # first decode step: inductor compiles here
            build_s[b] = time.perf_counter() - started
            print(f"  built {b} in {build_s[b]:.0f} s", flush=True)
        if "onnxruntime" in opts:   # the same ORT engines with IO binding (off on a CPU by default): does it help?
            bound = copy.copy(opts["onnxruntime"])
            bound.runtime = copy.copy(bound.runtime)
            attach_engines(bound.runtime, "onnxruntime", bound.engines[0], io_binding=True)
            opts["onnxruntime (IO binding)"] = bound
            build_s["onnxruntime (IO binding)"] = 0.0
        with torch.no_grad():
            ref_logits = opts["eager"](ids)
            logit_diff = {b: (o(ids) - ref_logits).abs().max().item() for b, o in opts.items()}
    outs: dict[str, torch.Tensor] = {}
    ms: dict[str, list[float]] = {b: [] for b in opts}
    with locked(True):
        for _ in range(args.lm_rounds):
            for b, o in opts.items():
                out = o.generate(ids, max_new_tokens=args.new_tokens)
                outs.setdefault(b, out)
                ms[b].append(o.last_stats.ms_per_token())
    same = {b: bool(torch.equal(outs[b], outs["eager"])) for b in outs}
    med = {b: statistics.median(v) for b, v in ms.items()}
    rows = {b: {"ms_per_token": med[b], "tokens_per_s": 1e3 / med[b], "speedup_over_eager": med["eager"] / med[b],
                "ms_per_token_rounds": ms[b], "greedy_tokens_equal_eager": same[b],
                "prefill_logits_max_abs_diff": logit_diff[b], "build_s": build_s[b]} for b in opts}
    for b, r in rows.items():
        print(f"  | {b} | {r['ms_per_token']:.1f} ms | {r['tokens_per_s']:.1f} tok/s | {r['speedup_over_eager']:.2f}x "
              f"| tokens equal: {r['greedy_tokens_equal_eager']} | {r['prefill_logits_max_abs_diff']:.1e} |")
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens, "rounds": args.lm_rounds,
            "pipeline": "(none: full cache)", "continuation": tok.decode(outs["eager"][0, ids.shape[1]:]), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="+", default=["vit", "minilm", "lm"], choices=["vit", "minilm", "lm"])
    ap.add_argument("--backends", nargs="+", default=BACKENDS)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--lm-rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.backends[0] != "eager":
        args.backends = ["eager"] + [b for b in args.backends if b != "eager"]
    path = RESULTS / "lowering_speed.json"
    for part in args.part:
        print(f"== {part}", flush=True)
        result = {"machine": machine(), **{"vit": part_vit, "minilm": part_minilm, "lm": part_lm}[part](args)}
        results = json.loads(path.read_text()) if path.exists() else {}   # re-read: parts may run concurrently
        results[part] = result
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
