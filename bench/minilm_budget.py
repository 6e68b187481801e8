"""MiniLM (real all-MiniLM-L6-v2) at Budget(flops=0.7): sentence-embedding fidelity and retrieval agreement.

Usage: python bench/minilm_budget.py [--n 256] [--budget flops=0.7] [--passes PIPELINE] [--out NAME]
Calibration uses sentences disjoint from the evaluation set. Embeddings are mean-pooled
(sentence-transformers' pooling for this model). Writes bench/results/minilm_budget.json.
"""
from __future__ import annotations

import argparse

import torch

import tcompile
from bench_common import interleaved_medians, save
from tcompile.models.data import pydoc_sentences
from tcompile.models.text import encode, load_minilm, load_minilm_tokenizer, mean_pool


def embed(fn, batches):
    with torch.no_grad():
        return torch.cat([mean_pool(fn(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256, help="evaluation sentences")
    ap.add_argument("--budget", default="flops=0.7")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--passes", default=None, help="force a pipeline instead of planning (ablations)")
    ap.add_argument("--out", default="minilm_budget")
    args = ap.parse_args()
    model, tok = load_minilm(), load_minilm_tokenizer()
    sentences = pydoc_sentences(args.n + 64)
    evaluation, calib = sentences[:args.n], sentences[args.n:]
    calibration = [encode(tok, calib[i:i + 16]) for i in range(0, 64, 16)]
    opt = tcompile.optimize(model, budget=args.budget, example_inputs=calibration[0], calibration=calibration,
                            passes=args.passes)
    batches = [encode(tok, evaluation[i:i + 32]) for i in range(0, args.n, 32)]
    ref, got = embed(model, batches), embed(opt, batches)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)

    def neighbours(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    agree = (neighbours(ref) == neighbours(got)).float().mean().item()
    med = interleaved_medians({"baseline": lambda: model(**batches[0]), "optimized": lambda: opt(**batches[0])},
                              args.rounds)
    flops = opt.report.flops
    result = {"pipeline": opt.pipeline, "budget": args.budget, "n_sentences": args.n,
              "flops_ratio": flops["optimized"] / flops["baseline"], "mean_cosine": cos.mean().item(),
              "min_cosine": cos.min().item(), "retrieval_top1_agreement": agree,
              "latency_ratio_batch32": med["optimized"]["median"] / med["baseline"]["median"],
              "median_s": {k: v["median"] for k, v in med.items()},
              "candidates": [c.__dict__ for c in opt.report.candidates]}
    print(f"pipeline {opt.pipeline}: FLOPs ratio {result['flops_ratio']:.3f}, mean cosine {result['mean_cosine']:.4f} "
          f"(min {result['min_cosine']:.4f}) over {args.n} sentences, retrieval top-1 agreement {agree:.3f}, "
          f"latency ratio {result['latency_ratio_batch32']:.3f} (batch 32, 64 tokens)")
    print(f"written {save(args.out, result)}")


if __name__ == "__main__":
    main()
