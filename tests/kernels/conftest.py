"""Kernel tests run the Triton kernels under the interpreter when no CUDA device is present.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated (triton reads it then), so
it is set here, before anything imports ``tcompile.kernels``. Without triton the tests skip.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover
    triton = None


def pytest_collection_modifyitems(config, items):
    if triton is not None:
        return
    skip = pytest.mark.skip(reason="triton is not installed (pip install 'triton>=3.0'); kernel tests need it")
    for item in items:
        if "tests/kernels" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: CUDA if present, else CPU through the Triton interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    from tcompile.kernels import block_sparse_attention as bsa
    assert type(bsa._block_sparse_fwd).__name__ == "InterpretedFunction", (
        "tcompile.kernels was imported before TRITON_INTERPRET=1 was set; run the kernel tests with "
        "TRITON_INTERPRET=1 in the environment")
    return torch.device("cpu")


@pytest.fixture
def cpu_path(monkeypatch):
    """Force the ops' PyTorch CPU path (what a CPU without the interpreter runs)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
