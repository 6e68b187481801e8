"""ONNX Runtime vs the eager rewritten graph for merged ViT-B/16: parity at another batch, and latency.

Usage: python bench/onnx_vit_b16.py [--r 16] [--rounds 5]
Exports with a batch of 8, checks batch 3, times batch 8. Writes bench/results/onnx_vit_b16.json.
"""
from __future__ import annotations

import argparse

import torch

import tcompile
from bench_common import interleaved_medians, save
from tcompile.models.vision import vit_b16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = vit_b16()
    gen = torch.Generator().manual_seed(0)
    x8 = {"pixel_values": torch.randn(8, 3, 224, 224, generator=gen)}
    x3 = {"pixel_values": torch.randn(3, 3, 224, 224, generator=gen)}
    pipe = f"token_merging{{r={args.r}}}"
    eager = tcompile.optimize(model, passes=pipe, example_inputs=x8, measure=False)
    ort = tcompile.optimize(model, passes=pipe, example_inputs=x8, backend="onnxruntime", measure=False)
    with torch.no_grad():
        err = (ort(**x3).logits - eager(**x3).logits).abs().max().item()
    med = interleaved_medians({"eager": lambda: eager(**x8), "onnxruntime": lambda: ort(**x8)}, args.rounds)
    result = {"pipeline": pipe, "max_abs_diff_batch3": err, "median_s": {k: v["median"] for k, v in med.items()},
              "ort_speedup_over_eager": med["eager"]["median"] / med["onnxruntime"]["median"]}
    print(f"{pipe}: ORT vs eager max |diff| at batch 3 = {err:.2e}; batch 8 median eager "
          f"{med['eager']['median']:.3f} s, ORT {med['onnxruntime']['median']:.3f} s "
          f"({result['ort_speedup_over_eager']:.2f}x)")
    print(f"written {save('onnx_vit_b16', result)}")


if __name__ == "__main__":
    main()
