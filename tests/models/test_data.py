"""Fast checks of tcompile.models.data: pydoc sentences and the committed Fashion-MNIST slice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tcompile.errors import ModelNotFoundError
from tcompile.models import data


def test_pydoc_sentences_deterministic_count_and_bounds() -> None:
    first = data.pydoc_sentences(200, min_words=6, max_words=40)
    assert first == data.pydoc_sentences(200, min_words=6, max_words=40)
    assert len(first) == 200 and len(set(first)) == 200
    for s in first:
        assert 6 <= len(s.split()) <= 40
        assert s == " ".join(s.split())  # whitespace-normalised
        assert s[0].isupper()
    # A longer request extends the shorter one: the order does not depend on n.
    assert data.pydoc_sentences(300)[:200] == first


def test_pydoc_sentences_respects_tighter_bounds() -> None:
    short = data.pydoc_sentences(50, min_words=8, max_words=12)
    assert all(8 <= len(s.split()) <= 12 for s in short)


def test_pydoc_sentences_too_many_raises() -> None:
    with pytest.raises(ValueError, match="available"):
        data.pydoc_sentences(10**6)


def test_calibration_shapes_dtypes_labels() -> None:
    x, y = data.fashion_mnist_calibration()
    assert x.shape == (512, 1, 56, 56) and x.dtype == torch.float32
    assert y.shape == (512,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert len(torch.unique(y)) == 10
    # Normalised with the training-set constants: roughly zero mean, unit spread.
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2

    x28, y28 = data.fashion_mnist_calibration(limit=16, size=28)
    assert x28.shape == (16, 1, 28, 28) and torch.equal(y28, y[:16])
    # Nearest-neighbour upscaling: every source pixel becomes an exact 2x2 block.
    assert torch.equal(x[:16, :, ::2, ::2], x28)


def _package_test_split() -> tuple[np.ndarray, np.ndarray]:
    try:
        return data.fashion_mnist_raw("test")
    except ModelNotFoundError as exc:
        pytest.skip(f"Debian package dataset-fashion-mnist not installed: {exc}")


def test_calibration_file_is_first_512_test_images() -> None:
    images, labels = _package_test_split()
    with np.load(data.CALIBRATION_FILE) as calib:
        assert calib["images"].dtype == np.uint8 and calib["images"].shape == (512, 28, 28)
        np.testing.assert_array_equal(calib["images"], images[:512])
        np.testing.assert_array_equal(calib["labels"], labels[:512])


def test_fashion_mnist_matches_calibration_preprocessing() -> None:
    _package_test_split()
    x, y = data.fashion_mnist("test", limit=32)
    cx, cy = data.fashion_mnist_calibration(limit=32)
    assert torch.equal(x, cx) and torch.equal(y, cy)


def test_missing_files_raise_with_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test")


def test_bad_split_raises() -> None:
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation")
