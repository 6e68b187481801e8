"""Backends: each lowers a rewritten GraphModule to a callable and saves/loads it in an artifact.

A backend is looked up by name; one whose package is missing raises
:class:`BackendUnavailableError` naming the extra to install, before any work is done.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tcompile.errors import BackendUnavailableError
from tcompile.lowering.capability import Capability, assess


@dataclass(frozen=True)
class Backend:
    name: str
    requires: tuple[str, ...]        # importable modules the backend needs
    extra: str                       # pip extra that installs them
    lower: Callable[..., Any]        # (module, args, kwargs, workdir) -> callable with .save(dir)
    load: Callable[[Path], Any]
    needs_cuda: bool = False         # refuses to start without a CUDA device
    engine_file: str | None = None   # the file a deployment serves (Triton layout), if any

    def capability(self, gm: Any) -> Capability:
        """Which ops of ``gm`` this backend runs, runs outside its engine, or cannot take."""
        return assess(self.name, gm)


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    """``module.attr`` imported on first call, so a missing optional package breaks only its backend."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)
    return call


def _load_method(module: str, cls: str) -> Callable[[Path], Any]:
    def load(directory: Path) -> Any:
        return getattr(importlib.import_module(module), cls).load(directory)
    return load


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", (), "", _lazy("tcompile.lowering.eager", "lower_eager"),
                     _load_method("tcompile.lowering.eager", "EagerModule")),
    "inductor": Backend("inductor", (), "", _lazy("tcompile.lowering.inductor", "lower_inductor"),
                        _load_method("tcompile.lowering.inductor", "InductorModule")),
    "aot": Backend("aot", (), "", _lazy("tcompile.lowering.aot", "lower_aot"),
                   _load_method("tcompile.lowering.aot", "AotModule"), engine_file="model.pt2"),
    "onnxruntime": Backend("onnxruntime", ("onnx", "onnxruntime", "onnxscript"), "onnx",
                           _lazy("tcompile.lowering.onnxruntime", "lower_onnxruntime"),
                           _load_method("tcompile.lowering.onnxruntime", "OrtModule"), engine_file="model.onnx"),
    "tensorrt": Backend("tensorrt", ("tensorrt", "torch_tensorrt"), "tensorrt",
                        _lazy("tcompile.lowering.tensorrt", "lower_tensorrt"),
                        _load_method("tcompile.lowering.tensorrt", "TensorRTModule"), needs_cuda=True,
                        engine_file="model.plan"),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, checked to be installed (and to have its device)."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    missing = [m for m in backend.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'tcompile[{backend.extra}]'")
    if backend.needs_cuda:
        import torch
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"backend {name!r} builds engines for NVIDIA GPUs and needs CUDA, but torch sees no CUDA device "
                f"(torch {torch.__version__}); run on a machine with a CUDA GPU and a CUDA build of torch, "
                "or use backend='onnxruntime' or 'inductor' on CPU")
    return backend
