"""Shared fixtures: tiny models captured once per session, the GPU marker's skip, and how the
suite splits over pytest-xdist workers (the README's `make test` runs `pytest -n 2 --dist loadfile`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Workers share the machine's cores: one torch thread per worker on a 2-core machine, and OpenMP
# threads that sleep instead of spinning while another worker computes. Set before torch loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# `python -m pytest` puts the repo root on sys.path. There the top-level `kernels/` source folder
# (installed as tcompile.kernels, guarded against top-level import) shadows Hugging Face's optional
# `kernels` package, which transformers probes on import. Tests import tcompile as installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from tcompile.capture import capture  # noqa: E402
from tcompile.models.vision import tiny_bert, tiny_vit  # noqa: E402


if _WORKERS > 1:
    torch.set_num_threads(_THREADS)

# Modules that take minutes (the real SmolLM2's capture and 128-token loops): scheduled first, one
# per worker under `--dist loadfile`, while the other modules fill in around them.
LONG_MODULES = ("tests/runtime/test_smollm2.py", "tests/runtime/test_smollm2_speculative.py")


def pytest_collection_modifyitems(config, items):
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONG_MODULES.index(path) if path in LONG_MODULES else len(LONG_MODULES)
    items.sort(key=rank)   # stable: every module's tests stay together and in order
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
