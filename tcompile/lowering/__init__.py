"""Backends: each lowers a rewritten GraphModule to a callable and saves/loads it in an artifact.

A backend is looked up by name; one whose package is missing raises
:class:`BackendUnavailableError` naming the extra to install, before any work is done.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tcompile.errors import BackendUnavailableError


@dataclass(frozen=True)
class Backend:
    name: str
    requires: tuple[str, ...]        # importable modules the backend needs
    extra: str                       # pip extra that installs them
    lower: Callable[..., Any]        # (module, args, kwargs, workdir) -> callable with .save(dir)
    load: Callable[[Path], Any]


def _lower_ort(module: Any, args: tuple, kwargs: dict, workdir: Path) -> Any:
    from tcompile.lowering.onnxruntime import lower_onnxruntime
    return lower_onnxruntime(module, args, kwargs, workdir)


def _load_ort(directory: Path) -> Any:
    from tcompile.lowering.onnxruntime import OrtModule
    return OrtModule.load(directory)


def _lower_eager(module: Any, args: tuple, kwargs: dict, workdir: Path) -> Any:
    from tcompile.lowering.eager import lower_eager
    return lower_eager(module, args, kwargs, workdir)


def _load_eager(directory: Path) -> Any:
    from tcompile.lowering.eager import EagerModule
    return EagerModule.load(directory)


def _not_yet(name: str) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise BackendUnavailableError(f"backend {name!r} is not implemented in this version of tcompile; "
                                      "use backend='eager' or backend='onnxruntime'")
    return fail


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", (), "", _lower_eager, _load_eager),
    "onnxruntime": Backend("onnxruntime", ("onnx", "onnxruntime", "onnxscript"), "onnx", _lower_ort, _load_ort),
    "inductor": Backend("inductor", (), "", _not_yet("inductor"), _not_yet("inductor")),
    "tensorrt": Backend("tensorrt", ("tensorrt", "torch_tensorrt"), "tensorrt", _not_yet("tensorrt"),
                        _not_yet("tensorrt")),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, checked to be installed."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    missing = [m for m in backend.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'tcompile[{backend.extra}]'")
    return backend
