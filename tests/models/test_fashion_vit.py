"""The committed Fashion-MNIST ViT loads and is as accurate as its training record says."""
from __future__ import annotations

import json

import pytest
import torch

from tcompile.errors import ModelNotFoundError
from tcompile.models import fashion_vit
from tcompile.models.data import fashion_mnist_calibration


@pytest.mark.slow
def test_calibration_accuracy_matches_record() -> None:
    model = fashion_vit.load_fashion_vit()
    assert not model.training
    assert model.config.image_size == 56 and model.config.patch_size == 4
    x, y = fashion_mnist_calibration()
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    assert logits.shape == (512, 10)
    acc = float((logits.argmax(-1) == y).float().mean())
    recorded = json.loads(fashion_vit.FASHION_VIT_RECORD.read_text())
    assert recorded["n_test"] == 10_000
    assert acc >= 0.80, f"calibration accuracy {acc:.3f}"
    assert abs(acc - recorded["test_accuracy"]) <= 0.05, (acc, recorded["test_accuracy"])


@pytest.mark.slow
def test_weights_are_small_fp32() -> None:
    from safetensors.torch import load_file

    assert fashion_vit.FASHION_VIT_WEIGHTS.stat().st_size < 5 * 2**20
    assert all(t.dtype == torch.float32 for t in load_file(str(fashion_vit.FASHION_VIT_WEIGHTS)).values())


@pytest.mark.slow
def test_missing_weights_raise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(fashion_vit, "FASHION_VIT_WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(ModelNotFoundError, match="train_fashion_vit"):
        fashion_vit.load_fashion_vit()
