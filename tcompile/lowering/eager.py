"""Backend ``eager``: run the rewritten GraphModule in PyTorch; export it as a ``.pt2`` program.

The artifact re-exports the rewritten graph with ``torch.export`` (dynamic batch), which traces
the inserted reducer functions into plain aten ops, and saves it with ``torch.export.save``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tcompile.errors import CaptureError
from tcompile.inputs import batch_inputs, call_names

PROGRAM_FILE = "program.pt2"


class EagerModule:
    """The rewritten graph as a callable with the original model's calling convention."""

    backend = "eager"

    def __init__(self, module: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None) -> None:
        self.module = module
        self.example_args, self.example_kwargs = example_args, dict(example_kwargs or {})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def save(self, directory: Path) -> list[str]:
        """Write ``program.pt2`` (an ExportedProgram with a dynamic batch) into ``directory``."""
        arg_names, kwarg_names = call_names(self.module, self.example_args, self.example_kwargs)
        kwargs = {n: self.example_kwargs[n] for n in kwarg_names}
        args, kwargs, shapes, _ = batch_inputs(arg_names, self.example_args, kwargs, True)
        try:
            ep = torch.export.export(self.module, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:
            raise CaptureError(f"could not export the rewritten graph for the eager artifact: {exc}") from exc
        torch.export.save(ep, str(Path(directory) / PROGRAM_FILE))
        return [PROGRAM_FILE]

    @classmethod
    def load(cls, directory: Path) -> "EagerModule":
        ep = torch.export.load(str(Path(directory) / PROGRAM_FILE))
        return cls(ep.module())


def lower_eager(module: torch.nn.Module, args: tuple, kwargs: dict, workdir: Path | None = None) -> EagerModule:
    return EagerModule(module, args, kwargs)
