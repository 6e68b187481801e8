"""Real data that ships offline: Fashion-MNIST images and English sentences from Python's docs.

Why: token-reduction passes must be judged on real inputs (real images for ToMe accuracy, real
sentences for text models), and the build machines have no model or dataset hub. Fashion-MNIST
comes from the Debian package ``dataset-fashion-mnist``; a 512-image calibration slice of its
test split is committed (``data/fashion_mnist_calib.npz``) so calibration and tests work without
the package. Sentences come from ``pydoc_data.topics``, present in every CPython.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tcompile.errors import ModelNotFoundError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CALIBRATION_FILE = Path(__file__).resolve().parent / "data" / "fashion_mnist_calib.npz"

# Pixel mean/std of the 60k training images scaled to [0, 1] (computed once from the IDX files).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# Upscaling is nearest neighbour: each source pixel becomes an exact k×k block, so no blur is
# invented and the 56x56 input holds exactly the information of the 28x28 original. Training and
# evaluation both go through to_model_input, so they agree on this.
INTERPOLATION_MODE = "nearest"

# Markers of reStructuredText headings, grammar productions, doctests and code, not prose.
_NOT_PROSE = ("***", "===", "---", "::=", ">>>", "...", "\\", "{", "}", "|")

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_raw(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return the raw uint8 images [N, 28, 28] and uint8 labels [N] of a Fashion-MNIST split."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist`, "
            "or use fashion_mnist_calibration() for the committed 512-image slice."
        )
    return _read_idx(images_path), _read_idx(labels_path)


def to_model_input(images: np.ndarray | torch.Tensor, size: int = 56) -> torch.Tensor:
    """Turn uint8 images [N, 28, 28] into normalised float32 [N, 1, size, size]."""
    if isinstance(images, torch.Tensor):
        x = images.to(torch.float32)
    else:  # the dtype conversion copies, so read-only IDX buffers never reach torch
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    x = x.div(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode=INTERPOLATION_MODE)
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def _limited(images: np.ndarray, labels: np.ndarray, limit: int | None,
             size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_model_input(images, size), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def fashion_mnist(split: str = "test", limit: int | None = None,
                  size: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from the Debian package: float32 images [N, 1, size, size] and int64 labels.

    Images are upscaled from 28x28 with nearest-neighbour interpolation and normalised with
    :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`. ``limit`` keeps the first N rows.
    Raises :class:`ModelNotFoundError` if the package is not installed.
    """
    images, labels = fashion_mnist_raw(split)
    return _limited(images, labels, limit, size)


def fashion_mnist_calibration(limit: int | None = None,
                              size: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 512 Fashion-MNIST test images from the committed npz, preprocessed as above.

    Needs no Debian package, so calibration and tests run anywhere.
    """
    if not CALIBRATION_FILE.is_file():
        raise ModelNotFoundError(
            f"Calibration file {CALIBRATION_FILE} is missing; reinstall tcompile from a full "
            "source tree (it ships as package data of tcompile.models)."
        )
    with np.load(CALIBRATION_FILE) as data:
        images, labels = data["images"], data["labels"]
    return _limited(images, labels, limit, size)


def pydoc_sentences(n: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Return ``n`` real English sentences from Python's reference docs (``pydoc_data``).

    Deterministic: topics are read in sorted key order, text is split on ``". "`` boundaries,
    whitespace is collapsed, sentences outside ``[min_words, max_words]`` words are dropped and
    duplicates keep their first occurrence. Raises ``ValueError`` if fewer than ``n`` qualify.
    """
    from pydoc_data.topics import topics  # stdlib; imported lazily because it is ~0.5 MB of text

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        # Collapse whitespace first so that a full stop before a line break is a boundary too.
        text = re.sub(r"\s+", " ", topics[key])
        for piece in text.split(". "):
            sentence = piece.strip()
            # Headings (*** / ===), grammar rules (::=), doctests (>>>) and code fragments run
            # into the next sentence when split this way; they are not prose, so drop them.
            if not sentence[:1].isupper() or any(m in sentence for m in _NOT_PROSE):
                continue
            if not sentence.endswith((".", "?", "!", ":")):
                sentence += "."  # the split ate the full stop
            words = len(sentence.split())
            if words < min_words or words > max_words or sentence in seen:
                continue
            seen.add(sentence)
            out.append(sentence)
            if len(out) == n:
                return out
    raise ValueError(
        f"only {len(out)} sentences with {min_words}-{max_words} words are available in "
        f"pydoc_data.topics, {n} were requested"
    )
