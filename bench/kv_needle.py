"""SmolLM2 KV-cache eviction: needle in a haystack and perplexity (decode speed: bench/kv_speed.py).

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/kv_needle.py [--contexts 1024 2048]
           [--ratios 0.5 0.25] [--ppl] [--out kv_needle]
(PASSIVE: OpenMP threads that spin while waiting make a loaded 2-core machine 5x slower.)
The prompts are bench/needle.py's (shared with bench/kvpress_peer.py, which measures kvpress on
the same ids). The whole prompt, question included, is prefilled, then evicted to the budget
(ratio × prompt tokens) before the first new token; decoding keeps the cache at the budget
(decode=evict). Perplexity: the first 1024 tokens of the held-out passage are the prompt, the
next 1024 are teacher-forced one step at a time with the cache evicted as it goes.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from bench_common import save
from needle import NEEDLE_CASES, needle_found, needle_prompt_ids, perplexity_text
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.registry import parse_pipeline
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import runtime_for

PASSES = ["kv_streaming{ratio=R,sinks=4}", "kv_snapkv{ratio=R}", "kv_snapkv{ratio=R,pool=max,kernel=15,spread=forward}",
          "kv_h2o{ratio=R}", "kv_tova{ratio=R}"]


def _runtimes(program, ratios, passes, extra):
    out = {"full": runtime_for(program, [])[0]}
    for text in extra:                         # pipelines taken as they are, e.g. prompt_pruning{keep=512}
        out[text] = runtime_for(program, parse_pipeline(text))[0]
    for ratio in ratios:
        for p in passes:
            text = p.replace("ratio=R", f"ratio={ratio}")
            out[text] = runtime_for(program, parse_pipeline(text))[0]
    return out


def needle(runtimes, tok, contexts, checkpoint, new_tokens=24):
    rows = {}
    for ctx in contexts:
        prompts = [(d, m, torch.tensor([needle_prompt_ids(tok, ctx, d, m)])) for d, m in NEEDLE_CASES]
        for name, rt in runtimes.items():
            found, texts = 0, []
            for depth, magic, ids in prompts:
                out = rt.generate(ids, max_new_tokens=new_tokens)
                text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                found += needle_found(text, magic)
                texts.append(text)
            rows.setdefault(name, {})[str(ctx)] = {"found": found, "of": len(prompts), "texts": texts,
                                                   "prompt_tokens": [int(p[2].shape[1]) for p in prompts]}
            print(f"needle ctx {ctx} {name}: {found}/{len(prompts)}", flush=True)
            checkpoint("needle", rows)
    return rows


def perplexity(runtimes, tok, checkpoint, prompt_tokens=1024, scored=1024):
    ids = torch.tensor(tok.encode(perplexity_text(), add_special_tokens=False))
    assert ids.numel() >= prompt_tokens + scored, "the held-out passage is too short"
    prompt, cont = ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + scored]
    rows = {}
    for name, rt in runtimes.items():
        logits = rt.teacher_force(prompt, cont)
        nll = torch.nn.functional.cross_entropy(logits.float(), cont).item()
        rows[name] = {"ppl": math.exp(nll), "nll": nll}
        print(f"perplexity {name}: {math.exp(nll):.3f}", flush=True)
        checkpoint("perplexity", rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--passes", nargs="*", default=PASSES)
    ap.add_argument("--extra", nargs="*", default=[], help="more pipelines, as written (no ratio substitution)")
    ap.add_argument("--ppl", action="store_true")
    ap.add_argument("--out", default="kv_needle")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    started = time.perf_counter()
    program = capture_lm(model, "SmolLM2-135M-Instruct")
    print(f"captured in {time.perf_counter() - started:.1f}s", flush=True)
    runtimes = _runtimes(program, args.ratios, args.passes, args.extra)
    result = {"model": "SmolLM2-135M-Instruct (fp32)", "new_tokens": 24, "needle_cases": NEEDLE_CASES,
              "passes": list(runtimes)}

    def checkpoint(key, rows):  # a long run keeps what it measured even if stopped
        result[key] = rows
        save(args.out, result)

    if args.contexts:
        needle(runtimes, tok, args.contexts, checkpoint)
    if args.ppl:
        perplexity(runtimes, tok, checkpoint)
    print(f"written {save(args.out, result)}")


if __name__ == "__main__":
    main()
