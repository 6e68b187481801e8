"""tcompile.optimize end to end on tiny models: planner, backends, artifacts, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

import tcompile
from tcompile.errors import (
    ArtifactError, BackendUnavailableError, BudgetError, BudgetUnreachableError, NoAttentionError, PassOptionError,
    UnknownPassError,
)
from tcompile.models.vision import tiny_vit


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_flops_budget_picks_least_aggressive_plan(vit_model, vit_inputs):
    before = _state(vit_model)
    opt = tcompile.optimize(vit_model, budget="flops=0.7", example_inputs=vit_inputs, repeats=1)
    rep = opt.report
    ratio = rep.flops["optimized"] / rep.flops["baseline"]
    assert ratio <= 0.7
    chosen = [c for c in rep.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].pipeline == opt.pipeline
    # one merge less (spread front-loaded, as the planner spreads them) would miss the budget
    spec = tcompile.parse_pipeline(opt.pipeline)[0]
    if spec.name == "token_merging":
        total = sum(spec.options.layers or [spec.options.r] * 4) - 1
        layers = [total // 4 + (1 if i < total % 4 else 0) for i in range(4)]
        weaker = tcompile.optimize(vit_model, passes=f"token_merging{{layers={layers}}}".replace(" ", ""),
                                   example_inputs=vit_inputs, measure=False)
        assert weaker.report.flops["optimized"] / weaker.report.flops["baseline"] > 0.7
    assert rep.fidelity["value"] > 0.9 and rep.latency["measured"]["baseline"] > 0
    ops = [o["op"] for o in rep.op_profile]              # torch.profiler's table of the optimized model
    assert ops and all(o["self_ms"] >= 0 for o in rep.op_profile) and any(op.startswith("aten::") for op in ops)
    parts = rep.latency["parts"]                         # predicted vs measured per block
    layers = [p for p in parts if p["part"] != "other"]
    assert len(layers) == len(rep.tokens_per_layer["optimized"]) and all(p["part"].endswith(str(i)) for i, p in
                                                                          enumerate(layers))
    assert all(p["predicted_s"] > 0 and p["measured_s"] > 0 for p in parts)
    assert all(torch.equal(v, before[k]) for k, v in vit_model.state_dict().items())
    y = opt(pixel_values=torch.randn(3, 3, 32, 32))
    assert y.logits.shape == (3, 5)


def test_quality_budget_unreachable_reports_best(vit_model, vit_inputs):
    with pytest.raises(BudgetUnreachableError, match="best fidelity") as info:
        tcompile.optimize(vit_model, budget="flops=0.7,quality=0.99999999", example_inputs=vit_inputs,
                          measure=False)
    assert "fidelity" in info.value.best


def test_cost_budget_unreachable_reports_best(vit_model, vit_inputs):
    with pytest.raises(BudgetUnreachableError, match="most aggressive plan reaches"):
        tcompile.optimize(vit_model, budget="flops=0.05", example_inputs=vit_inputs, measure=False)


def test_baseline_pipeline_is_exact(vit_model, vit_inputs):
    opt = tcompile.optimize(vit_model, passes=[], example_inputs=vit_inputs, repeats=1)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(opt(pixel_values=x).logits, vit_model(pixel_values=x).logits)
    assert opt.pipeline == ""


@pytest.mark.parametrize("budget", [0, 1.5, "latency=0", "flops=-1", "speed=0.5", "quality=2"])
def test_bad_budgets(vit_model, vit_inputs, budget):
    with pytest.raises(BudgetError):
        tcompile.optimize(vit_model, budget=budget, example_inputs=vit_inputs)


def test_module_without_attention():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    before = _state(mlp)
    with pytest.raises(NoAttentionError, match="no attention site"):
        tcompile.optimize(mlp, budget=0.5, example_inputs=(torch.randn(2, 8),))
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())


def test_unknown_pass_and_option(vit_model, vit_inputs):
    with pytest.raises(UnknownPassError, match="unknown pass 'token_mixing'"):
        tcompile.optimize(vit_model, passes="token_mixing{r=2}", example_inputs=vit_inputs)
    with pytest.raises(PassOptionError, match="no option"):
        tcompile.optimize(vit_model, passes="token_merging{radius=2}", example_inputs=vit_inputs)


def test_r_larger_than_tokens_allow(vit_model, vit_inputs):
    with pytest.raises(PassOptionError, match="exceeds what 65 tokens allow"):
        tcompile.optimize(vit_model, passes="token_merging{r=100}", example_inputs=vit_inputs)


def test_missing_backend(vit_model, vit_inputs):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tcompile\[tensorrt\]'"):
        tcompile.optimize(vit_model, backend="tensorrt", example_inputs=vit_inputs)
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        tcompile.optimize(vit_model, backend="tvm", example_inputs=vit_inputs)


def test_wrong_input_shape_is_explained(vit_model, vit_inputs):
    opt = tcompile.optimize(vit_model, passes="token_merging{r=4}", example_inputs=vit_inputs, measure=False)
    with pytest.raises(ValueError, match="compiled for"):
        opt(pixel_values=torch.randn(2, 3, 48, 48))


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_export_load_round_trip(vit_model, vit_inputs, tmp_path, backend):
    opt = tcompile.optimize(vit_model, passes="token_merging{r=6}", example_inputs=vit_inputs,
                            backend=backend, measure=False)
    path = opt.export(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["pipeline"] == "token_merging{r=6}" and manifest["backend"] == backend
    assert {"report.json", "report.html", "report.md"} <= set(manifest["files"])
    loaded = tcompile.load(path)
    x = torch.randn(3, 3, 32, 32)                        # a batch other than the captured one
    torch.testing.assert_close(loaded(pixel_values=x).logits, opt(pixel_values=x).logits, rtol=1e-4, atol=1e-4)
    model_file = next(f for f in manifest["files"] if not f.startswith("report"))
    data = bytearray((path / model_file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / model_file).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified after export"):
        tcompile.load(path)


def test_onnxruntime_matches_eager_rewritten_graph(vit_model, vit_inputs):
    eager = tcompile.optimize(vit_model, passes="token_merging{r=6,method=pitome}", example_inputs=vit_inputs,
                              measure=False)
    ort = tcompile.optimize(vit_model, passes="token_merging{r=6,method=pitome}", example_inputs=vit_inputs,
                            backend="onnxruntime", measure=False)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(ort(pixel_values=x).logits, eager(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


def test_export_refuses_to_overwrite_foreign_directory(vit_model, vit_inputs, tmp_path):
    opt = tcompile.optimize(vit_model, passes=[], example_inputs=vit_inputs, measure=False)
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a tcompile artifact"):
        opt.export(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_kv_budget_on_an_encoder_and_bad_calibration_batches(vit_model, vit_inputs):
    with pytest.raises(BudgetError, match="applies to causal LMs"):
        tcompile.optimize(vit_model, budget="kv_cache=0.5", example_inputs=vit_inputs)
    wrong = {"pixel_values": vit_inputs["pixel_values"][:, :, :16, :16]}
    with pytest.raises(ValueError, match="calibration batch 1 does not fit the model's inputs"):
        tcompile.optimize(vit_model, budget="flops=0.7", example_inputs=vit_inputs, calibration=[vit_inputs, wrong])
