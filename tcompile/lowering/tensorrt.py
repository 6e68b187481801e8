"""Backend ``tensorrt``: a TensorRT engine built from the rewritten program by torch-tensorrt's dynamo path.

Deliberately thin: the graph handed to TensorRT is the one every other backend gets, re-exported
with the program's dynamic batch by :func:`tcompile.lowering.inductor.export_dynamic_batch` (the
ONNX Runtime tests validate the same re-exported graph on CPU). What is TensorRT-specific here:

* precision: ``"fp16"``/``"bf16"`` cast the weights and float inputs before export, so the engine
  is explicitly typed (torch-tensorrt's recommended mode; ``enabled_precisions`` is deprecated);
* shape profiles: dim 0 of each batched input gets ``min=1, opt=<example batch>, max=max_batch``;
  a sequence profile needs a graph captured with a dynamic sequence, which token rewrites that
  bake token counts do not allow, so other dims are fixed at the export's sizes;
* partitions: tcompile's ``torch.library`` custom ops have no TensorRT converter; they are
  passed as ``torch_executed_ops`` and run in PyTorch partitions between TensorRT engines, and
  the report lists them (see :mod:`tcompile.lowering.capability`).

The artifact holds ``model.ep`` (the compiled program, engines embedded; ``torch_tensorrt.load``)
and, when the whole graph became one engine, the raw serialized engine ``model.plan`` that
``trtexec`` or Triton Inference Server's ``tensorrt_plan`` platform loads. Without torch-tensorrt
or CUDA, :func:`tcompile.lowering.get_backend` refuses first, naming the fix.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tcompile import _compat
from tcompile.errors import ArtifactError, BackendUnavailableError, CaptureError
from tcompile.lowering.capability import assess
from tcompile.lowering.inductor import export_dynamic_batch

logger = logging.getLogger(__name__)

PROGRAM_FILE = "model.ep"
ENGINE_FILE = "model.plan"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def require_tensorrt() -> ModuleType:
    """torch_tensorrt, or a BackendUnavailableError naming the extra (and CUDA when it is absent)."""
    try:
        trt = importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise BackendUnavailableError("backend 'tensorrt' needs torch-tensorrt and TensorRT, which are not "
                                      "installed; install them with: pip install 'tcompile[tensorrt]'") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("backend 'tensorrt' needs a CUDA GPU, but torch sees no CUDA device; "
                                      "run on a machine with CUDA or use backend='onnxruntime'")
    return trt


def _cast(tree: Any, dtype: torch.dtype, device: torch.device) -> Any:
    leaves, spec = _compat.tree_flatten(tree)
    moved = [x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
             if isinstance(x, torch.Tensor) else x for x in leaves]
    return _compat.tree_unflatten(moved, spec)


def _profiles(trt: ModuleType, tree: Any, batch: int, max_batch: int) -> Any:
    """``torch_tensorrt.Input`` per tensor leaf: a batch range on dim 0 of batched inputs."""
    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.ndim == 0 or x.shape[0] != batch:
            return trt.Input(shape=tuple(x.shape), dtype=x.dtype)
        rest = tuple(x.shape[1:])
        return trt.Input(min_shape=(1, *rest), opt_shape=(batch, *rest), max_shape=(max_batch, *rest), dtype=x.dtype)
    leaves, tspec = _compat.tree_flatten(tree)
    return _compat.tree_unflatten([spec(x) for x in leaves], tspec)


class TensorRTModule:
    """A torch-tensorrt compiled program (TensorRT engines plus PyTorch fallback partitions)."""

    backend = "tensorrt"

    def __init__(self, module: Any, dtype: torch.dtype, fallbacks: list[str], program_path: Path | None = None,
                 engine_path: Path | None = None) -> None:
        self.module, self.dtype, self.fallbacks = module, dtype, fallbacks
        self.program_path, self.engine_path = program_path, engine_path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _cast((args, kwargs), self.dtype, torch.device("cuda"))
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def save(self, directory: Path) -> list[str]:
        """Copy ``model.ep`` (and ``model.plan`` when the graph is one engine) into ``directory``."""
        files = []
        for path, name in ((self.program_path, PROGRAM_FILE), (self.engine_path, ENGINE_FILE)):
            if path is not None:
                (Path(directory) / name).write_bytes(Path(path).read_bytes())
                files.append(name)
        return files

    @classmethod
    def load(cls, directory: Path) -> "TensorRTModule":
        trt = require_tensorrt()
        path = Path(directory) / PROGRAM_FILE
        if not path.is_file():
            raise ArtifactError(f"no {PROGRAM_FILE} in {directory}; copy the whole artifact or re-export it")
        program = trt.load(str(path))
        dtype = next((p.dtype for p in program.state_dict.values() if p.is_floating_point()), torch.float32)
        engine = Path(directory) / ENGINE_FILE
        return cls(program.module(), dtype, [], path, engine if engine.is_file() else None)


def lower_tensorrt(module: torch.nn.Module, args: tuple, kwargs: dict, workdir: Path, *, precision: str = "fp16",
                   max_batch: int = 32, min_block_size: int = 5) -> TensorRTModule:
    """Build TensorRT engines for ``module`` at ``precision`` with a batch profile 1..``max_batch``."""
    trt = require_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype, cuda = PRECISIONS[precision], torch.device("cuda")
    module = module.to(device=cuda, dtype=dtype) if dtype != torch.float32 else module.to(cuda)
    args, kwargs = _cast((tuple(args), dict(kwargs)), dtype, cuda)
    program = export_dynamic_batch(module, args, kwargs, "tensorrt")
    fallbacks = assess("tensorrt", program.graph_module).fallbacks
    batch = next(int(x.shape[0]) for x in _compat.tree_flatten((args, kwargs))[0]
                 if isinstance(x, torch.Tensor) and x.ndim)
    arg_inputs, kwarg_inputs = _profiles(trt, (args, kwargs), batch, max_batch)
    workdir = Path(workdir)
    try:
        compiled = trt.dynamo.compile(program, arg_inputs=list(arg_inputs), kwarg_inputs=kwarg_inputs,
                                      torch_executed_ops=set(fallbacks), min_block_size=min_block_size)
        trt.save(compiled, str(workdir / PROGRAM_FILE), output_format="exported_program",
                 arg_inputs=list(args), kwarg_inputs=kwargs)
        engine_path = None
        if not fallbacks:   # one engine: also write the raw plan a TensorRT runtime loads directly
            engine = trt.dynamo.convert_exported_program_to_serialized_trt_engine(
                program, arg_inputs=list(arg_inputs), kwarg_inputs=kwarg_inputs)
            engine_path = workdir / ENGINE_FILE
            engine_path.write_bytes(bytes(engine))
    except Exception as exc:
        raise CaptureError(f"torch-tensorrt could not build the engine: {type(exc).__name__}: {exc}") from exc
    if fallbacks:
        logger.info("tensorrt: %s run in PyTorch partitions", ", ".join(fallbacks))
    return TensorRTModule(compiled, dtype, fallbacks, workdir / PROGRAM_FILE, engine_path)
