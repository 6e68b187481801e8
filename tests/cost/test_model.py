"""Latency prediction (roofline + per-op overhead) and the timing helper."""
from __future__ import annotations

import time

import pytest
import torch
from torch.export import Dim

from tcompile.cost.flops import KINDS, NodeCost, dynamic_symbols
from tcompile.cost.model import (
    VIEW_OVERHEAD_FRACTION,
    measure_latency,
    measure_op_overhead,
    predict_breakdown,
    predict_latency,
    predict_node_seconds,
)
from tcompile.cost.profile import DeviceProfile

PROFILE = DeviceProfile(name="test", kind="cpu", matmul_flops={"float32": 1e11, "bfloat16": 4e11},
                        elementwise_flops=1e10, mem_bandwidth=1e10, op_overhead=1e-5,
                        source="measured")


def test_roofline_takes_the_slower_of_compute_and_memory() -> None:
    compute_bound = NodeCost(flops=1e9, bytes=1e6, kind="matmul")
    assert predict_node_seconds(compute_bound, "float32", PROFILE) == pytest.approx(1e-2 + 1e-5)
    assert predict_node_seconds(compute_bound, "bfloat16", PROFILE) == pytest.approx(2.5e-3 + 1e-5)
    memory_bound = NodeCost(flops=1e6, bytes=1e9, kind="elementwise")
    assert predict_node_seconds(memory_bound, "float32", PROFILE) == pytest.approx(1e-1 + 1e-5)
    elementwise = NodeCost(flops=1e9, bytes=0.0, kind="elementwise")  # elementwise rate, not matmul
    assert predict_node_seconds(elementwise, "float32", PROFILE) == pytest.approx(1e-1 + 1e-5)
    view = NodeCost(0.0, 0.0, "view")
    assert predict_node_seconds(view, "float32", PROFILE) == pytest.approx(VIEW_OVERHEAD_FRACTION * 1e-5)
    assert predict_node_seconds(NodeCost(0.0, 0.0, "view", 0.0), "float32", PROFILE) == 0.0
    assert predict_node_seconds(compute_bound, "float32", "h100") < 1e-4  # by target name


def export_vit(image_size: int, batch: int = 2, dynamic: bool = False) -> torch.fx.GraphModule:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    shapes = ({0: Dim("batch", min=1, max=64)},) if dynamic else None
    ep = torch.export.export(ViTModel(cfg).eval(), (torch.randn(batch, 3, image_size, image_size),),
                             dynamic_shapes=shapes, strict=False)
    return ep.graph_module


@pytest.fixture(scope="module")
def vits() -> dict[int, torch.fx.GraphModule]:
    return {size: export_vit(size) for size in (32, 64)}


@pytest.mark.parametrize("profile", [PROFILE, "h100", "l4"])
def test_prediction_grows_with_token_count(vits: dict[int, torch.fx.GraphModule], profile) -> None:
    small, large = predict_latency(vits[32], profile), predict_latency(vits[64], profile)  # 17 vs 65 tokens
    assert 0 < small < large


def test_breakdown_sums_to_latency(vits: dict[int, torch.fx.GraphModule]) -> None:
    breakdown = predict_breakdown(vits[64], PROFILE)
    assert set(KINDS) <= set(breakdown)
    assert sum(breakdown.values()) == pytest.approx(predict_latency(vits[64], PROFILE))
    assert breakdown["matmul"] > 0 and breakdown["attention"] > 0 and breakdown["view"] > 0
    assert breakdown["other"] == 0


def test_prediction_follows_batch_of_a_dynamic_export() -> None:
    gm = export_vit(32, dynamic=True)
    (sym,) = dynamic_symbols(gm)
    at_hint = predict_latency(gm, PROFILE)
    assert predict_latency(gm, PROFILE, sizes={sym: 2}) == pytest.approx(at_hint)
    by_batch = [predict_latency(gm, PROFILE, sizes={sym: b}) for b in (1, 2, 8, 32)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    # Minus the fixed per-op overhead (~70 ops: most of a tiny ViT's time) the rest scales ~linearly.
    fixed = predict_latency(gm, PROFILE, sizes={sym: 1}) - (by_batch[1] - by_batch[0])
    assert (by_batch[3] - fixed) / (by_batch[1] - fixed) == pytest.approx(16, rel=0.1)


def test_measure_latency_counts_and_stats() -> None:
    calls: list[bool] = []
    result = measure_latency(lambda: calls.append(torch.is_grad_enabled()), repeats=4, warmup=2)
    assert len(calls) == 6 and not any(calls)  # warmup + repeats, under no_grad
    assert result["repeats"] == 4 and len(result["times"]) == 4
    assert result["min"] <= result["median"] <= result["max"]
    with pytest.raises(ValueError):
        measure_latency(lambda: None, repeats=0)


def test_measure_latency_respects_max_seconds() -> None:
    start = time.perf_counter()
    result = measure_latency(lambda: time.sleep(0.02), repeats=1000, warmup=1, max_seconds=0.15)
    assert time.perf_counter() - start < 0.5
    assert 1 <= result["repeats"] < 10 and result["median"] >= 0.02
    once = measure_latency(lambda: time.sleep(0.01), repeats=5, warmup=3, max_seconds=0.0)
    assert once["repeats"] == 1  # a spent budget still yields one timed call


def test_measure_op_overhead_is_microseconds() -> None:
    overhead = measure_op_overhead("cpu", max_seconds=0.2)
    # Microseconds when quiet; on a contended machine ops that open OpenMP regions (sdpa, gelu)
    # wait for descheduled threads, so allow up to 10 ms rather than flake.
    assert 1e-7 < overhead < 1e-2
