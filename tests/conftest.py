"""Shared fixtures: tiny models captured once per session, and the GPU marker's skip."""
from __future__ import annotations

import sys
from pathlib import Path

# `python -m pytest` puts the repo root on sys.path. There the top-level `kernels/` source folder
# (installed as tcompile.kernels, guarded against top-level import) shadows Hugging Face's optional
# `kernels` package, which transformers probes on import. Tests import tcompile as installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from tcompile.capture import capture  # noqa: E402
from tcompile.models.vision import tiny_bert, tiny_vit  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vit_model():
    return tiny_vit(image_size=32, patch_size=4, layers=4)


@pytest.fixture(scope="session")
def vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="session")
def vit_program(vit_model, vit_inputs):
    return capture(vit_model, vit_inputs)


@pytest.fixture(scope="session")
def bert_model():
    return tiny_bert(layers=3)


@pytest.fixture(scope="session")
def bert_inputs():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 24), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 14:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def bert_program(bert_model, bert_inputs):
    return capture(bert_model, bert_inputs)
