"""Backend ``tensorrt``: fails fast without torch-tensorrt or CUDA; builds and matches eager where both exist.

The graph TensorRT gets is the re-exported rewritten program that the ONNX Runtime and Inductor
tests validate on CPU; only the engine build below needs a GPU with TensorRT.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import tcompile
from tcompile.errors import BackendUnavailableError
from tcompile.lowering import get_backend
from tcompile.models.vision import tiny_vit

HAVE_TRT = importlib.util.find_spec("torch_tensorrt") is not None and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="torch-tensorrt is installed here; the missing-package path cannot be shown")
def test_missing_package_names_the_extra() -> None:
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tcompile\[tensorrt\]'"):
        get_backend("tensorrt")
    with pytest.raises(BackendUnavailableError, match=r"tcompile\[tensorrt\]"):
        tcompile.optimize(tiny_vit(layers=1), passes=[], example_inputs={"pixel_values": torch.randn(2, 3, 32, 32)},
                          backend="tensorrt")


def test_no_cuda_names_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("tensorrt", "torch_tensorrt") else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs CUDA.*no CUDA device"):
        get_backend("tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs torch-tensorrt and TensorRT (pip install 'tcompile[tensorrt]')")
def test_engine_matches_eager_and_round_trips(tmp_path: Path) -> None:
    model = tiny_vit(image_size=16, patch_size=4, layers=2)
    x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    eager = tcompile.optimize(model, passes="token_merging{r=4}", example_inputs=x, measure=False)
    trt = tcompile.optimize(model, passes="token_merging{r=4}", example_inputs=x, backend="tensorrt", measure=False)
    want = eager(**x).logits
    got = trt(**{k: v.cuda() for k, v in x.items()}).logits.float().cpu()
    assert (got - want).abs().max().item() < 2e-2      # fp16 engine
    assert trt.report.lowering["backend"] == "tensorrt"
    again = tcompile.load(trt.export(tmp_path / "art"))
    assert (again(**x).logits.float().cpu() - want).abs().max().item() < 2e-2
