"""Lower a captured (possibly rewritten) module to ONNX and run it with ONNX Runtime.

The input is a module from ``torch.export.export(...).module()``, perhaps with extra
``call_function`` nodes added by tcompile's passes. It is re-captured with a dynamic batch
dimension and exported with ``torch.onnx.export(..., dynamo=True)``; the resulting
:class:`OrtModule` keeps the original calling convention (named inputs in, ``ModelOutput`` out)
so callers can swap it in for the torch module.
"""
from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tcompile import _compat
from tcompile.artifact import atomic_write_text
from tcompile.errors import ArtifactError, BackendUnavailableError, CaptureError
from tcompile.inputs import batch_inputs, call_names
from tcompile.lowering._onnx_io import (
    IO_FILE,
    ORT_DTYPES,
    OnnxIO,
    output_names,
    to_numpy,
)

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
_FIX = "pip install 'tcompile[onnx]'"


def _require_onnx() -> ModuleType:
    """Import the ONNX stack lazily, so tcompile imports (and other backends work) without it."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BackendUnavailableError(
            f"the ONNX Runtime backend needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; fix: {_FIX}"
        )
    return importlib.import_module("onnxruntime")


def default_providers(ort: ModuleType) -> list[str]:
    """CUDA first when both onnxruntime and torch can use a GPU, else CPU only.

    Checking torch as well avoids picking the CUDA provider of an onnxruntime-gpu wheel on a
    machine without a usable driver, where session creation would fail or fall back noisily.
    """
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _external_files(onnx_path: Path) -> list[str]:
    """Relative names of the external-data files an ``.onnx`` file refers to."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: list[str] = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in found:
                found.append(location)
    return found


def lower_onnxruntime(
    module: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    workdir: Path,
    *,
    dynamic_batch: bool = True,
    providers: list[str] | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
) -> OrtModule:
    """Export ``module`` to ``workdir/model.onnx`` (+ ``onnx_io.json``) and open it in ORT.

    With ``dynamic_batch`` dim 0 of every tensor input whose dim 0 equals the example batch
    becomes the ONNX dim ``batch``. A batch of 1 would be specialised to 1 by the exporter, so
    such examples are repeated to a batch of 2 first. ``external_data=None`` keeps the weights in
    the ``.onnx`` file unless they exceed protobuf's 2 GB limit; ``True`` forces a data file.
    """
    _require_onnx()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    arg_names, kwarg_names = call_names(module, tuple(args), dict(kwargs or {}))
    kwargs = {n: kwargs[n] for n in kwarg_names}
    args, kwargs, dynamic_shapes, batch = batch_inputs(arg_names, tuple(args), kwargs, dynamic_batch)

    program = _capture(module, args, kwargs, dynamic_shapes)
    out_spec = program.call_spec.out_spec
    in_spec = program.call_spec.in_spec
    flat_inputs, spec = _compat.tree_flatten((args, kwargs))
    if in_spec != spec:
        raise CaptureError(f"torch.export reordered the inputs unexpectedly: {in_spec}")
    names = output_names(out_spec)
    onnx_program = _to_onnx(program, names, opset)
    onnx_path = workdir / ONNX_FILE
    for stale in (onnx_path, workdir / f"{ONNX_FILE}.data"):  # never append to an old data file
        stale.unlink(missing_ok=True)
    onnx_program.save(str(onnx_path), external_data=external_data)

    onnx_inputs = [v.name for v in onnx_program.model.graph.inputs]
    placeholders = list(program.graph_signature.user_inputs)
    leaf_inputs = [n if n in onnx_inputs else None for n in placeholders]
    unmapped = sorted(set(onnx_inputs) - set(placeholders))
    if len(placeholders) != len(flat_inputs) or unmapped:
        raise CaptureError(f"cannot map ONNX inputs {unmapped or onnx_inputs} to the module inputs")
    if len(onnx_program.model.graph.outputs) != len(names):
        raise CaptureError(f"ONNX graph has {len(onnx_program.model.graph.outputs)} outputs, expected {names}")

    io = OnnxIO(
        arg_names=arg_names, kwarg_names=kwarg_names, in_spec=in_spec, leaf_inputs=leaf_inputs,
        output_names=names, out_spec=out_spec, model_file=ONNX_FILE,
        data_files=_external_files(onnx_path), dynamic_batch=dynamic_shapes is not None,
        export_batch=batch, opset=opset,
    )
    atomic_write_text(workdir / IO_FILE, io.to_json())
    logger.info("exported %s (inputs %s, outputs %s)", onnx_path, onnx_inputs, names)
    return OrtModule(onnx_path, io, providers=providers)


def _capture(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> Any:
    """Re-capture the module so the batch dim is symbolic; rewritten nodes are traced through."""
    try:
        return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch raises many unrelated types here
        hint = ""
        if dynamic_shapes is not None:
            hint = (
                "; if the module was captured with a fixed batch, capture it with "
                "dynamic_shapes={name: {0: torch.export.Dim('batch')}} or lower with dynamic_batch=False"
            )
        raise CaptureError(f"could not re-capture the module for ONNX export: {exc}{hint}") from exc


def _to_onnx(program: Any, names: list[str], opset: int | None) -> Any:
    try:
        return torch.onnx.export(
            program, (), dynamo=True, output_names=names, opset_version=opset, verbose=False
        )
    except Exception as exc:
        raise CaptureError(f"torch.onnx.export failed: {exc}") from exc


class OrtModule:
    """An ``onnxruntime.InferenceSession`` behind the calling convention of the torch module.

    Call it like the exported module (``m(pixel_values=x)``); it returns the same structure
    (e.g. ``ImageClassifierOutput``) holding torch tensors on the device of the inputs.
    """

    def __init__(self, model_path: Path, io: OnnxIO, *, providers: list[str] | None = None) -> None:
        ort = _require_onnx()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.model_path = Path(model_path)
        self.io = io
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=providers or default_providers(ort)
        )
        self._declared = {i.name: (ORT_DTYPES.get(i.type), i.shape) for i in self.session.get_inputs()}

    @property
    def input_names(self) -> list[str]:
        """ONNX input names, in graph order."""
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        """ONNX output names, in the flattened order of the output structure."""
        return list(self.io.output_names)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses."""
        return list(self.session.get_providers())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves = self.io.flatten_call(args, kwargs)
        feed: dict[str, Any] = {}
        device: torch.device | None = None
        for leaf, name in zip(leaves, self.io.leaf_inputs):
            if name is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise CaptureError(f"input {name!r} must be a tensor, got {type(leaf).__name__}")
            device = device or leaf.device
            feed[name] = to_numpy(name, leaf, *self._declared[name])
        outputs = self.session.run(self.io.output_names, feed)
        tensors = [torch.from_numpy(o) for o in outputs]
        if device is not None and device.type != "cpu":
            tensors = [t.to(device) for t in tensors]
        return self.io.unflatten_outputs(tensors)

    def save(self, directory: Path) -> list[str]:
        """Write ``model.onnx`` (+ external data) and ``onnx_io.json``; return their relative names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = [self.io.model_file, *self.io.data_files]
        if directory.resolve() != self.model_path.parent.resolve():
            for name in files:
                shutil.copy2(self.model_path.parent / name, directory / name)
        atomic_write_text(directory / IO_FILE, self.io.to_json())
        return [*files, IO_FILE]

    @classmethod
    def load(cls, directory: Path, providers: list[str] | None = None) -> OrtModule:
        """Rebuild from a directory written by :meth:`save` or :func:`lower_onnxruntime`."""
        directory = Path(directory)
        io_path = directory / IO_FILE
        if not io_path.is_file():
            raise ArtifactError(f"no {IO_FILE} in {directory}; save the OrtModule there first")
        try:
            io = OnnxIO.from_json(io_path.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{io_path} is unreadable ({exc}); re-export the model") from exc
        missing = [n for n in (io.model_file, *io.data_files) if not (directory / n).is_file()]
        if missing:
            raise ArtifactError(f"{directory} lacks {missing}; copy the whole directory or re-export")
        return cls(directory / io.model_file, io, providers=providers)

