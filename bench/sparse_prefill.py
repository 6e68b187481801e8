"""Sparse prefill attention (MInference 1.0, Jiang et al., NeurIPS 2024) on this CPU: speed and quality.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/sparse_prefill.py [--parts attention e2e] [--quality]
(PASSIVE: OpenMP threads that spin while waiting make a loaded 2-core machine 5x slower.)

(a) attention: one attention call at 8k tokens, batch 1, SmolLM2's heads (9 query heads, 3 KV
    heads, d=64, fp32), the op the pass inserts (``tcompile::sparse_prefill_attention``: pattern
    estimation + the gathered CPU path) against dense ``F.scaled_dot_product_attention``
    (is_causal=True; and with the explicit [1,1,N,N] additive mask the captured prefill passes),
    in interleaved rounds, ratio of medians. Two inputs: q/k/v recorded from SmolLM2 layer
    ``--layer`` on 8k tokens of pydoc text (real attention: what the estimate sees in use) and
    seeded random q/k/v. ``visited`` = gathered key/query pairs / causal pairs (the work done).
(b) e2e: SmolLM2 prefill (``runtime.prefill_fn(ids, mask)``) at 4k and 8k pydoc tokens with
    ``sparse_attention{pattern=vertical_slash,density=0.3}`` against the dense captured prefill.
(c) --quality: for dense and each ``--quality-specs`` pipeline (``auto:D:R`` = pattern=auto at
    density D, recall R, calibrated by ``calibrate`` on 4,096 tokens of pydoc topics 40-69, which
    start ~200k characters in, far past every haystack, and end before the perplexity topics):
    needle accuracy (bench/needle.py's six cases at ~1k and ~4k tokens, greedy, 24 new tokens,
    ``runtime.generate``) and the perplexity of a 4,096-token held-out pydoc passage computed from
    ONE prefill of the whole passage through tcompile's (sparse) prefill graph: the graph is
    copied and made to also output the final-norm hidden states of every position (it returns
    only the last position's logits), and logits = hidden @ lm_head.weight, so every position's
    attention is the sparse prefill's. The passage is ``perplexity_text()`` (~2.6k tokens)
    preceded by the four pydoc topics (70-73) that neither the haystacks nor that text use, cut
    to 4,096 tokens.
Results: bench/results/sparse_prefill.json.
"""
from __future__ import annotations

import argparse
import json
import math
import operator
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from bench_common import RESULTS, interleaved_medians, save
from needle import NEEDLE_CASES, PERPLEXITY_KEYS, _KEYS, _TOPICS, needle_found, needle_prompt_ids, perplexity_text
from tcompile import _compat
from tcompile.analysis.graph_utils import SDPA_OPS
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.passes import sparse_ops
from tcompile.passes.sparse_attention import SparseAttentionOptions, calibrate
from tcompile.registry import PassSpec, parse_pipeline
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import runtime_for

OP = torch.ops.tcompile.sparse_prefill_attention.default
# name -> pass options besides density (the rest are SparseAttentionOptions' defaults): vertical_slash as
# MInference's kernel computes it (tiles, the default), its exact-lines variant, block_topk
PATTERNS = {"vertical_slash": {"pattern": "vertical_slash"},
            "vertical_slash_exact": {"pattern": "vertical_slash", "tiles": False},
            "block_topk": {"pattern": "block_topk"}}


def op_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: SparseAttentionOptions) -> torch.Tensor:
    """The pass's op on one unpadded row with options ``o`` (what the rewritten prefill runs)."""
    return OP(q, k, v, None, sparse_ops.CODE_OF[o.pattern], float(o.density), o.block, o.sinks, o.window, o.last_q,
              0, -1.0, o.tiles)


def pydoc_ids(tok, tokens: int) -> torch.Tensor:
    text = "\n\n".join(_TOPICS[k].strip() for k in _KEYS)
    ids = tok.encode(text[: tokens * 8], add_special_tokens=False)[:tokens]
    return torch.tensor([ids])


def record_qkv(program, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
    """q, k, v entering SDPA at ``layer`` of the dense prefill graph, on ``ids``."""
    gm = _compat.clone_graph_module(program.prefill.gm)
    site = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS][layer]
    _compat.append_graph_outputs(gm, list(site.args[:3]))
    with torch.no_grad():
        return tuple(t.contiguous() for t in gm(ids, torch.ones_like(ids))[-3:])


def visited(o: SparseAttentionOptions, q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """Gathered (query, key) pairs over causal pairs: the work the CPU path does."""
    h, n = q.shape[1], q.shape[2]
    kv_of = torch.arange(h) // (h // k.shape[1])
    code = sparse_ops.CODE_OF[o.pattern]
    idx = sparse_ops.estimate(code, q[0], k[0], kv_of, o.density, o.block, o.sinks, o.window, o.last_q, scale)
    visits = (sparse_ops.slash_visits(*idx, n, o.block, o.tiles) if code == "v"
              else sparse_ops.block_visits(*idx, o.block))
    return sum(float(part.count.sum()) for part in visits) * o.block / (h * sparse_ops.causal_pairs(n))


def attention_part(program, tok, tokens: int, layer: int, densities: list[float], rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {"smollm2_layer%d" % layer: record_qkv(program, pydoc_ids(tok, tokens), layer),
              "random": tuple(torch.randn(1, h, tokens, 64, generator=g) for h in (9, 3, 3))}
    out: dict = {}
    for name, (q, k, v) in inputs.items():
        scale = 1 / math.sqrt(q.shape[-1])
        mask = torch.zeros(tokens, tokens).masked_fill(~torch.ones(tokens, tokens, dtype=torch.bool).tril(),
                                                       torch.finfo(torch.float32).min)[None, None]
        fns = {"dense_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               "dense_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)}
        options = {f"{pattern}@{dens:g}": SparseAttentionOptions(density=dens, **extra)
                   for pattern, extra in PATTERNS.items() for dens in densities}
        for key, o in options.items():
            fns[key] = lambda o=o: op_call(q, k, v, o)
        times = interleaved_medians(fns, rounds)
        base = times["dense_causal"]["median"]
        rows = {}
        for key, t in times.items():
            row = {"median_s": t["median"], "times_s": t["times"], "speedup_vs_dense_causal": base / t["median"],
                   "speedup_vs_dense_mask": times["dense_mask"]["median"] / t["median"]}
            if key in options:
                row["visited"] = visited(options[key], q, k, scale)
            rows[key] = row
            print(f"  {name:18s} {key:22s} {t['median'] * 1e3:8.1f} ms  x{row['speedup_vs_dense_causal']:.2f}"
                  + (f"  visited {row['visited']:.3f}" if "visited" in row else ""), flush=True)
        out[name] = rows
    return out


def e2e_part(program, tok, contexts: list[int], spec: str, rounds: int) -> dict:
    dense, _ = runtime_for(program, [])
    sparse, _ = runtime_for(program, parse_pipeline(spec))
    out = {}
    for ctx in contexts:
        ids = pydoc_ids(tok, ctx)
        mask = torch.ones_like(ids)
        times = interleaved_medians({"dense": lambda: dense.prefill_fn(ids, mask),
                                     "sparse": lambda: sparse.prefill_fn(ids, mask)}, rounds, warmup=0)
        out[str(ctx)] = {k: {"median_s": v["median"], "times_s": v["times"]} for k, v in times.items()}
        out[str(ctx)]["speedup"] = times["dense"]["median"] / times["sparse"]["median"]
        print(f"  e2e prefill {ctx}: dense {times['dense']['median']:.2f} s, sparse {times['sparse']['median']:.2f} s, "
              f"x{out[str(ctx)]['speedup']:.2f}", flush=True)
    return out


def with_hidden(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A copy of a prefill graph that also outputs the final hidden states [B, N, D] (the input of
    the lm_head's last-position slice), and the lm_head weight."""
    gm = _compat.clone_graph_module(gm)
    head = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default][-1]
    sliced, weight = head.args[0], head.args[1]
    hidden = sliced.args[0] if sliced.target is torch.ops.aten.slice.Tensor else sliced
    _compat.append_graph_outputs(gm, [hidden])
    return gm, operator.attrgetter(weight.target)(gm)


def perplexity(runtime, ids: torch.Tensor) -> float:
    gm, weight = with_hidden(runtime.prefill_fn)
    with torch.no_grad():
        hidden = gm(ids, torch.ones_like(ids))[-1][0]
        nll = torch.zeros(())
        for s in range(0, ids.shape[1] - 1, 512):
            e = min(s + 512, ids.shape[1] - 1)
            nll += F.cross_entropy(hidden[s:e] @ weight.T, ids[0, s + 1:e + 1], reduction="sum")
    return math.exp(float(nll) / (ids.shape[1] - 1))


def calibration_ids(tok, tokens: int) -> torch.Tensor:
    """``auto``'s calibration prompt: pydoc topics 40-69, after every ~1k/~4k haystack's end and
    before the perplexity passage's topics (70-78), so it overlaps neither."""
    text = "\n\n".join(_TOPICS[k].strip() for k in _KEYS[40:70])
    return torch.tensor([tok.encode(text, add_special_tokens=False)[:tokens]])


def quality_runtime(program, tok, spec: str):
    """The runtime of a pipeline text, or of ``auto:DENSITY:RECALL`` (calibrated here) ."""
    if not spec.startswith("auto:"):
        return runtime_for(program, parse_pipeline(spec) if spec else [])[0], spec
    _, density, recall = spec.split(":")
    options = calibrate(program, calibration_ids(tok, 4096), SparseAttentionOptions(density=float(density),
                                                                                      recall=float(recall)))
    return runtime_for(program, [PassSpec("sparse_attention", options)])[0], str(PassSpec("sparse_attention", options))


def quality_part(program, tok, specs: list[str], contexts: list[int]) -> dict:
    unused = [k for k in _KEYS[70:] if k not in PERPLEXITY_KEYS]
    text = "\n\n".join(_TOPICS[k].strip() for k in unused) + "\n\n" + perplexity_text()
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:4096]])
    out: dict = {"perplexity_tokens": int(ids.shape[1])}
    for spec in ["", *specs]:
        started = time.perf_counter()
        rt, text_spec = quality_runtime(program, tok, spec)
        row: dict = {"pipeline": text_spec or "dense", "perplexity": perplexity(rt, ids)}
        print(f"  {spec or 'dense'}: perplexity {row['perplexity']:.3f}", flush=True)
        for ctx in contexts:
            found = []
            for depth, magic in NEEDLE_CASES:
                prompt = torch.tensor([needle_prompt_ids(tok, ctx, depth, magic)])
                new = rt.generate(prompt, max_new_tokens=24)[0, prompt.shape[1]:]
                found.append(needle_found(tok.decode(new, skip_special_tokens=True), magic))
            row[f"needle_{ctx}"] = {"found": sum(found), "of": len(found), "per_case": found}
            print(f"    needle ~{ctx}: {sum(found)}/{len(found)}", flush=True)
        row["seconds"] = time.perf_counter() - started
        out[spec or "dense"] = row
    for key, row in out.items():
        if isinstance(row, dict):
            row["perplexity_vs_dense"] = row["perplexity"] / out["dense"]["perplexity"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["attention", "e2e"], choices=["attention", "e2e"])
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--densities", type=float, nargs="*", default=[0.05, 0.1, 0.3])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--e2e-contexts", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--e2e-rounds", type=int, default=3)
    ap.add_argument("--spec", default="sparse_attention{pattern=vertical_slash,density=0.3}")
    ap.add_argument("--quality-contexts", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--quality-specs", nargs="*", default=[
        "sparse_attention{pattern=vertical_slash,density=0.3}",
        "sparse_attention{pattern=vertical_slash,density=0.3,tiles=true,last_q=256}",
        "sparse_attention{pattern=block_topk,density=0.3}", "auto:0.3:0.9"])
    args = ap.parse_args()
    tok = load_smollm2_tokenizer()
    program = capture_lm(load_smollm2(), "SmolLM2-135M-Instruct")
    payload: dict = {"threads": torch.get_num_threads(), "spec": args.spec}
    started = time.perf_counter()
    if "attention" in args.parts:
        payload["attention"] = attention_part(program, tok, args.tokens, args.layer, args.densities, args.rounds)
    if "e2e" in args.parts:
        payload["e2e_prefill"] = e2e_part(program, tok, args.e2e_contexts, args.spec, args.e2e_rounds)
    if args.quality:
        t0 = time.perf_counter()
        payload["quality"] = quality_part(program, tok, args.quality_specs, args.quality_contexts)
        payload["quality"]["seconds"] = time.perf_counter() - t0
    payload["seconds"] = time.perf_counter() - started
    previous = RESULTS / "sparse_prefill.json"          # parts run separately accumulate in one file
    merged = json.loads(previous.read_text()) if previous.exists() else {}
    merged.pop("machine", None)
    for key in ("attention", "e2e_prefill", "quality"):
        if key in payload:
            payload[key] = {"measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload[key]}
    print("wrote", save("sparse_prefill", {**merged, **payload}))


if __name__ == "__main__":
    main()
