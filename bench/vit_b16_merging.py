"""ViT-B/16, 224x224, batch 8, fp32, eager backend: throughput of token merging vs the unoptimized model.

Usage: python bench/vit_b16_merging.py [--rounds 7] [--r 8 13 16]
Prints a Markdown table (ratios of medians from one interleaved run) and writes
bench/results/vit_b16_merging.json.
"""
from __future__ import annotations

import argparse

import torch

import tcompile
from bench_common import interleaved_medians, save
from tcompile.models.vision import vit_b16

# ToMe's own implementation on timm 1.0.31 ViT-B/16, batch 8, this machine type (figures from the issue).
TOME_REFERENCE = {8: 1.23, 13: 1.57, 16: 1.82}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13, 16])
    ap.add_argument("--pitome", action="store_true", help="also time PiToMe at the largest r")
    args = ap.parse_args()
    model = vit_b16()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    inputs = {"pixel_values": x}
    baseline = tcompile.optimize(model, passes=[], example_inputs=inputs, measure=False)
    configs = {f"token_merging{{r={r}}}": r for r in args.r}
    if args.pitome:
        configs[f"token_merging{{r={max(args.r)},method=pitome}}"] = max(args.r)
    opts = {p: tcompile.optimize(model, passes=p, example_inputs=inputs, measure=False) for p in configs}
    fns = {"hf-eager": lambda: model(**inputs), "baseline": lambda: baseline(**inputs)}
    fns.update({p: (lambda o=o: o(**inputs)) for p, o in opts.items()})
    med = interleaved_medians(fns, args.rounds)
    base = med["baseline"]["median"]
    rows = []
    print(f"| pipeline | median s/batch | throughput vs baseline | vs HF eager | FLOPs ratio | ToMe (timm) same r |")
    print("|---|---|---|---|---|---|")
    for name in fns:
        flops = opts[name].report.flops if name in opts else None
        fr = flops["optimized"] / flops["baseline"] if flops else 1.0
        row = {"pipeline": name, "median_s": med[name]["median"], "speedup": base / med[name]["median"],
               "speedup_vs_hf": med["hf-eager"]["median"] / med[name]["median"], "flops_ratio": fr,
               "tome_reference": TOME_REFERENCE.get(configs.get(name)), "times": med[name]["times"]}
        rows.append(row)
        ref = f"{row['tome_reference']:.2f}x" if row["tome_reference"] else "-"
        print(f"| {name} | {row['median_s']:.3f} | {row['speedup']:.2f}x | {row['speedup_vs_hf']:.2f}x | "
              f"{fr:.3f} | {ref} |")
    print(f"\nwritten {save('vit_b16_merging', {'batch': args.batch, 'rounds': args.rounds, 'rows': rows})}")


if __name__ == "__main__":
    main()
