"""Fashion-MNIST ViT (trained here, 197 tokens): accuracy vs throughput for ToMe, PiToMe and EViT pruning.

Usage: python bench/fashion_vit_curve.py [--rounds 5] [--limit N]
Accuracy on the Fashion-MNIST test split (10k images; Debian package dataset-fashion-mnist),
throughput from interleaved timing of batch 64, eager backend. Writes
bench/results/fashion_vit_curve.json.
"""
from __future__ import annotations

import argparse

import torch

import tcompile
from bench_common import interleaved_medians, save
from tcompile.models.data import fashion_mnist
from tcompile.models.fashion_vit import load_fashion_vit

PIPELINES = (
    [f"token_merging{{r={r}}}" for r in (8, 16, 24, 32)]
    + [f"token_merging{{r={r},method=pitome}}" for r in (8, 16, 24, 32)]
    + [f"token_pruning{{keep={k}}}" for k in (0.9, 0.7, 0.5, 0.3)]
)


def accuracy(fn, images, labels, batch=500) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((fn(pixel_values=images[i:i + batch]).logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    model = load_fashion_vit()
    images, labels = fashion_mnist("test", limit=args.limit)
    example = {"pixel_values": images[:64]}
    opts = {"baseline": tcompile.optimize(model, passes=[], example_inputs=example, measure=False)}
    opts.update({p: tcompile.optimize(model, passes=p, example_inputs=example, measure=False) for p in PIPELINES})
    med = interleaved_medians({k: (lambda o=o: o(**example)) for k, o in opts.items()}, args.rounds)
    base_acc = accuracy(opts["baseline"], images, labels)
    rows = []
    print("| pipeline | accuracy | Δ points | throughput × | FLOPs ratio |")
    print("|---|---|---|---|---|")
    for name, opt in opts.items():
        acc = base_acc if name == "baseline" else accuracy(opt, images, labels)
        fl = opt.report.flops
        row = {"pipeline": name, "accuracy": acc, "delta_points": 100 * (acc - base_acc),
               "speedup": med["baseline"]["median"] / med[name]["median"],
               "flops_ratio": fl["optimized"] / fl["baseline"], "median_s": med[name]["median"]}
        rows.append(row)
        print(f"| {name} | {acc:.4f} | {row['delta_points']:+.2f} | {row['speedup']:.2f}x | {row['flops_ratio']:.3f} |")
    fast = [r for r in rows if r["speedup"] >= 1.5]
    best = max(fast, key=lambda r: r["accuracy"]) if fast else None
    if best:
        print(f"\nbest at >=1.5x throughput: {best['pipeline']} ({best['speedup']:.2f}x, "
              f"{best['delta_points']:+.2f} points)")
    print(f"written {save('fashion_vit_curve', {'n_test': len(images), 'rows': rows, 'best_at_1_5x': best})}")


if __name__ == "__main__":
    main()
