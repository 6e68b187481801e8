"""Cost model validation (issue 6, acceptance 1): predicted vs measured latency on this CPU.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cost_validation.py [--parts vit prefill decode]

The CPU profile is re-measured before each part (``cpu_profile(refresh=True)``, as ``tcompile
calibrate`` does: a run takes ~17 minutes and this machine's speed drifts over that), then
``tcompile.cost.validate`` predicts each configuration from its rewritten graph and times it in
interleaved rounds (9 by default, 36 for a decode step; each configuration's median
ratio to the unoptimized one within a round, times the latter's median: a shared machine's slow
spells span rounds, and single SmolLM2 prefills vary +-10% call to call here):
  vit      ViT-B/16 (random init), batch 8, 224x224, fp32: token merging r=0..16, pruning
  prefill  SmolLM2-135M, one 1,024-token prompt: sparse attention densities/patterns, GemFilter keeps
  decode   SmolLM2-135M, one decode step after a 2,048-token prompt: KV policies and budgets
Per part: Spearman's rho between predicted and measured, and the median |predicted/measured - 1|.
Results: bench/results/cost_validation.json.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench_common import save
from tcompile.cost import cpu_profile
from tcompile.cost.validation import validate

VIT = ["", *(f"token_merging{{r={r}}}" for r in (2, 4, 6, 8, 10, 12, 14, 16)),
       "token_pruning{keep=0.7}", "token_pruning{keep=0.5}"]
PREFILL = ["", "sparse_attention{density=0.5}", "sparse_attention{density=0.3}", "sparse_attention{density=0.1}",
           "sparse_attention{pattern=block_topk,density=0.3}", "sparse_attention{pattern=a_shape,density=0.2}",
           "prompt_pruning{keep=768}", "prompt_pruning{keep=512}", "prompt_pruning{keep=256}",
           "prompt_pruning{keep=512},sparse_attention{density=0.3}"]
DECODE = ["", "kv_streaming{ratio=0.75}", "kv_streaming{ratio=0.5}", "kv_streaming{ratio=0.25}",
          "kv_streaming{ratio=0.1}", "kv_snapkv{ratio=0.5}", "kv_snapkv{ratio=0.25}", "kv_h2o{ratio=0.25}",
          "kv_tova{ratio=0.1}", "prompt_pruning{keep=512}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["vit", "prefill", "decode"], choices=["vit", "prefill", "decode"])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    started = time.perf_counter()
    payload: dict = {"parts": {}}

    def part(name: str, *inputs: Any, **options: Any) -> None:
        """Re-measure the profile, validate, print, and save the part as soon as it is measured."""
        profile = cpu_profile(refresh=True)
        result = validate(*inputs, profile=profile, **options)
        print(result.table(), flush=True)
        payload["parts"][name] = {**result.to_dict(), "device_profile": profile.to_dict()}
        save("cost_validation", payload)

    if "vit" in args.parts:
        from tcompile.models.vision import vit_b16
        part("vit_b16_batch8", vit_b16().eval(), VIT, {"pixel_values": torch.randn(8, 3, 224, 224)},
             rounds=args.rounds)
    if {"prefill", "decode"} & set(args.parts):
        from tcompile.models.lm import load_smollm2
        from tcompile.runtime import capture_lm
        program = capture_lm(load_smollm2(), "SmolLM2-135M-Instruct")
        for phase, configs, tokens in (("prefill", PREFILL, 1024), ("decode", DECODE, 2048)):
            if phase in args.parts:
                part(f"smollm2_{phase}_{tokens}", program, configs, phase=phase, tokens=tokens,
                     rounds=args.rounds if phase == "prefill" else 4 * args.rounds)
    payload["seconds"] = time.perf_counter() - started
    print("wrote", save("cost_validation", payload))


if __name__ == "__main__":
    main()
