"""Backends ``inductor`` and ``aot``: the rewritten graph compiled by Inductor / AOTInductor.

One tiny merged ViT (2 layers, 16 tokens, ``lowered_vit`` in conftest.py) keeps each compile to
tens of seconds on two cores; each backend compiles once per session (plus a cache-hit reload).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tcompile
from tcompile.lowering import get_backend
from tcompile.lowering.capability import assess

ATOL = 1e-4


@pytest.fixture(scope="module")
def eager(lowered_vit):
    return lowered_vit("eager")


@pytest.fixture(scope="module", params=["inductor", "aot"])
def lowered(request, lowered_vit):
    return lowered_vit(request.param)


def test_matches_eager_and_round_trips(lowered, eager, x2, tmp_path: Path) -> None:
    with torch.no_grad():
        want = eager(**x2).logits
        got = lowered(**x2).logits
    assert (got - want).abs().max().item() <= ATOL
    assert lowered.report.lowering["backend"] == lowered.backend
    assert lowered.report.lowering["fallbacks"] == [] and lowered.report.lowering["partitions"] == 1
    path = lowered.export(tmp_path / "art")
    files = {p.name for p in path.iterdir()}
    assert ("model.pt2" if lowered.backend == "aot" else "program.pt2") in files
    again = tcompile.load(path)
    assert again.backend == lowered.backend
    with torch.no_grad():
        assert (again(**x2).logits - want).abs().max().item() <= ATOL


def test_serves_another_batch(lowered, eager) -> None:
    # both compile the batch symbolic on a CPU (inductor: see InductorModule), so no recompile
    x3 = {"pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        assert (lowered(**x3).logits - eager(**x3).logits).abs().max().item() <= ATOL


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN (mkldnn)")
def test_inductor_freezes_and_packs_linear_weights_for_onednn_on_cpu() -> None:
    """Freezing is held in Inductor's config during the compile (``torch.compile(options=...)``
    ignores it), the symbolic batch sends fp32 linears to oneDNN's packed GEMM, and the GELU is
    not fused into that GEMM (tcompile.lowering.inductor_passes)."""
    from torch._dynamo.utils import counters

    from tcompile.lowering.inductor import InductorModule
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(3, 16)
    program = torch.export.export(mlp, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    module = InductorModule(program)
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):   # a cache hit would skip the passes counted
        got = module(x)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] >= 2
    assert counters["inductor"]["mkldnn_unary_fusion_matcher_count"] == 0   # GELU stays out of the GEMM
    with torch.no_grad():
        assert (got - mlp(x)).abs().max().item() <= ATOL
        assert module(torch.randn(5, 16)).shape == (5, 8)


def test_step_settings_are_named_and_cpu_only() -> None:
    """``compile_for_inference``'s step settings (the LM decode/verify steps ask for them) map to
    Inductor's config on a CPU, are left out elsewhere, and an unknown name is refused by name."""
    from tcompile.lowering.inductor import STEP_SETTINGS, compile_for_inference
    mlp = torch.nn.Linear(4, 4)
    on_cpu = compile_for_inference(mlp, on_cpu=True, step_settings=tuple(STEP_SETTINGS))
    assert on_cpu.config["cpp.threads"] == 1 and on_cpu.config["cpp_wrapper"] is True
    assert on_cpu.config["cpp.enable_concat_linear"] is True
    assert "cpp_wrapper" not in compile_for_inference(mlp, on_cpu=False, step_settings=("cpp_wrapper",)).config
    with pytest.raises(ValueError, match="'fast_math'.*known"):
        compile_for_inference(mlp, on_cpu=True, step_settings=("fast_math",))


def test_custom_ops_are_fallbacks_for_compilers_and_refused_by_onnx() -> None:
    lib = torch.library.Library("tcompile_test", "FRAGMENT")  # noqa: F841 (keeps the op alive)

    @torch.library.custom_op("tcompile_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(double(x + 1)) - 1

    gm = torch.export.export(M(), (torch.randn(2, 3),)).module()
    for name in ("inductor", "aot", "tensorrt"):
        cap = assess(name, gm)
        assert cap.fallbacks == ["tcompile_test::double"] and cap.partitions == 2, cap
    cap = get_backend("onnxruntime").capability(gm)
    assert cap.unsupported == ["tcompile_test::double"] and "unsupported" in cap.summary()
    assert assess("eager", gm).fallbacks == []
