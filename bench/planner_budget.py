"""Planner under a latency budget (issue 6, acceptance 2): ViT-B/16, batch 8, Budget(latency=0.5, quality=0.97).

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/planner_budget.py [--rounds 5]

``tcompile.optimize`` plans (cost model first, then measured latency and fidelity of the most
promising candidates), then, in the same run, the chosen plan and the captured baseline are timed
in interleaved rounds on the calibration batch: the budget is met when the measured latency ratio
is <= 0.5 and the output cosine on the calibration batches is >= 0.97. Calibration: two batches
of 8 random images (random-init weights, as every ViT-B/16 figure here). Results:
bench/results/planner_budget.json, the report in out/planner_vit/.
"""
from __future__ import annotations

import argparse
import time

import torch

import tcompile
from bench_common import interleaved_medians, save
from tcompile.models.vision import vit_b16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 3, 224, 224, generator=g)} for _ in range(2)]
    model = vit_b16().eval()
    started = time.perf_counter()
    opt = tcompile.optimize(model, budget=tcompile.Budget(latency=0.5, quality=0.97), example_inputs=batches[0],
                            calibration=batches, time_limit=1200)
    plan_s = time.perf_counter() - started
    baseline = tcompile.optimize(model, passes=[], example_inputs=batches[0], measure=False)
    x = batches[0]
    times = interleaved_medians({"baseline": lambda: baseline(**x), "optimized": lambda: opt(**x)}, args.rounds)
    ratio = times["optimized"]["median"] / times["baseline"]["median"]
    fidelity = opt.report.fidelity.get("value")
    print(opt.report.summary())
    print(f"chosen {opt.pipeline}: measured latency ratio {ratio:.3f} (budget 0.5), fidelity {fidelity:.4f} "
          f"(budget 0.97), planning {plan_s:.0f} s")
    opt.export("out/planner_vit")
    save("planner_budget", {"budget": {"latency": 0.5, "quality": 0.97}, "pipeline": opt.pipeline,
                            "latency_ratio": ratio, "fidelity": fidelity, "planning_s": plan_s,
                            "times": {k: v["times"] for k, v in times.items()},
                            "candidates": [c.__dict__ for c in opt.report.candidates],
                            "met": ratio <= 0.5 and fidelity >= 0.97})


if __name__ == "__main__":
    main()
