"""Backend ``aot``: an AOTInductor package (``.pt2``) that runs without Python-side tracing.

The rewritten graph is re-exported with the program's dynamic batch (the same program the
``eager`` and ``inductor`` backends use) and compiled ahead of time by AOTInductor into one
``model.pt2`` package: generated C++/Triton code, a shared library and the weights. Loading it
(``aoti_load_package``) runs no Dynamo, no Inductor and no export, so it is the artifact to ship
where start-up time or a Python-free runtime matters; a C++ deployment can load the same file
with ``torch::inductor::AOTIModelPackageLoader``. The batch stays symbolic in the compiled code
(range 1..MAX_BATCH); other dims are the export's, so a new image size or sequence length needs
a new compile. tcompile's custom ops stay extern calls in the generated code and must be
registered (``import tcompile``) in the process that loads the package.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tcompile import _compat
from tcompile.errors import ArtifactError, CaptureError
from tcompile.lowering.inductor import export_dynamic_batch

logger = logging.getLogger(__name__)

PACKAGE_FILE = "model.pt2"


class AotModule:
    """A loaded AOTInductor package, called like the original model (pytree in, pytree out)."""

    backend = "aot"

    def __init__(self, package: Path) -> None:
        self.package = Path(package)
        try:
            self.runner = _compat.aoti_load_package(str(self.package))
        except Exception as exc:  # the loader raises RuntimeError with C++ context; say what to do
            raise ArtifactError(f"could not load the AOTInductor package {self.package}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}; it must be loaded with the "
                                f"torch version (and device) that compiled it: re-export the artifact") from exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The compiled code indexes every input with the contiguous strides of the export's
        # examples and does not check them: an expanded or transposed view (a stride-0 ``slot``
        # of the LM decode step, say) would be read out of bounds. Contiguous copies cost nothing
        # for inputs that already are.
        leaves, spec = _compat.tree_flatten((args, kwargs))
        args, kwargs = _compat.tree_unflatten([x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
        with torch.no_grad():
            return self.runner(*args, **kwargs)

    def save(self, directory: Path) -> list[str]:
        """Copy ``model.pt2`` into ``directory`` (it is already the whole engine)."""
        target = Path(directory) / PACKAGE_FILE
        if target.resolve() != self.package.resolve():
            target.write_bytes(self.package.read_bytes())
        return [PACKAGE_FILE]

    @classmethod
    def load(cls, directory: Path) -> "AotModule":
        path = Path(directory) / PACKAGE_FILE
        if not path.is_file():
            raise ArtifactError(f"no {PACKAGE_FILE} in {directory}; copy the whole artifact or re-export it")
        return cls(path)


def compile_package(program: Any, path: Path, options: dict | None = None) -> Path:
    """AOT-compile an ExportedProgram to ``path`` (a ``.pt2`` package)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    try:
        return Path(_compat.aoti_compile_and_package(program, str(path), options))
    except Exception as exc:
        raise CaptureError(f"AOTInductor could not compile the rewritten program: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}; backend='inductor' compiles "
                           "the same graph just in time") from exc


def lower_aot(module: torch.nn.Module, args: tuple, kwargs: dict, workdir: Path, *,
              options: dict | None = None) -> AotModule:
    """Re-export ``module`` with a dynamic batch, AOT-compile it to ``workdir/model.pt2`` and load it."""
    program = export_dynamic_batch(module, args, kwargs, "aot")
    logger.info("aot: compiling %s", Path(workdir) / PACKAGE_FILE)
    return AotModule(compile_package(program, Path(workdir) / PACKAGE_FILE, options))
