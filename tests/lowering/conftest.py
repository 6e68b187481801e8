"""One tiny merged ViT lowered once per backend for every lowering test module (an AOTInductor
compile takes about a minute on two cores; test_artifacts and test_inductor_aot share it)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import tcompile
from tcompile.models.vision import tiny_vit

PIPE = "token_merging{r=4}"


@pytest.fixture(scope="session")
def model() -> torch.nn.Module:
    """A 2-layer ViT on 16x16 images (16 tokens): each compile stays at tens of seconds."""
    return tiny_vit(image_size=16, patch_size=4, layers=2)


@pytest.fixture(scope="session")
def x2() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="session")
def lowered_vit(model, x2) -> Callable[[str], Any]:
    """``lowered_vit(backend)``: ``model`` optimized with PIPE for ``backend``, built on first use."""
    built: dict[str, Any] = {}

    def get(backend: str) -> Any:
        if backend not in built:
            built[backend] = tcompile.optimize(model, passes=PIPE, example_inputs=x2, backend=backend, measure=False)
        return built[backend]
    return get
