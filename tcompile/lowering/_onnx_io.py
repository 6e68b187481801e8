"""How Python calls map onto an exported ONNX graph's flat inputs and outputs, and back.

ONNX graphs take and return flat lists of named tensors, while a module from
``torch.export(...).module()`` takes ``(args, kwargs)`` pytrees and returns a structure such as a
transformers ``ModelOutput``. :class:`OnnxIO` records both sides (as JSON, so an ``.onnx`` file
plus ``onnx_io.json`` is enough to rebuild the callable) and converts between them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from tcompile import _compat
from tcompile.errors import CaptureError

IO_FILE = "onnx_io.json"
IO_VERSION = 1
# ONNX Runtime input type strings -> the torch dtype fed for them
ORT_DTYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def to_numpy(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, shape: list[Any]) -> Any:
    """A contiguous CPU numpy array of the dtype and static dims the ONNX input declares.

    Casting within a kind (int32 ids to int64, float16 pixels to float32) is what a caller
    means; casting across kinds (float ids) would hide a bug, so it is refused. Shapes are
    checked here because onnxruntime's own message does not say which dims are dynamic.
    """
    tensor = tensor.detach()
    fixed = [d if isinstance(d, int) else None for d in shape]
    if len(fixed) != tensor.ndim or any(f is not None and f != s for f, s in zip(fixed, tensor.shape)):
        raise CaptureError(
            f"input {name!r} has shape {tuple(tensor.shape)} but the ONNX graph takes {shape} "
            "(named dims are dynamic, numbers are fixed); re-export with inputs of the shape you need"
        )
    if dtype is not None and tensor.dtype != dtype:
        same_kind = tensor.is_floating_point() == dtype.is_floating_point and (
            (tensor.dtype == torch.bool) == (dtype == torch.bool)
        )
        if not same_kind:
            raise CaptureError(f"input {name!r} must be {dtype}, got {tensor.dtype}")
        tensor = tensor.to(dtype)
    return tensor.cpu().contiguous().numpy()


def output_names(spec: _compat.TreeSpec) -> list[str]:
    """ONNX output names from the output structure's key paths: ``logits``, ``hidden_states_1``."""
    names: list[str] = []
    for path in _compat.leaf_paths(spec):
        name = re.sub(r"\W+", "_", path).strip("_") or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        base, n = name, 1
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


@dataclass
class OnnxIO:
    """The calling convention of an exported ONNX graph, serialisable to ``onnx_io.json``.

    ``leaf_inputs[i]`` is the ONNX input fed by flattened input leaf ``i``, or ``None`` when the
    exporter dropped that leaf (a constant or an unused tensor).
    """

    arg_names: list[str]
    kwarg_names: list[str]
    in_spec: _compat.TreeSpec
    leaf_inputs: list[str | None]
    output_names: list[str]
    out_spec: _compat.TreeSpec
    model_file: str = "model.onnx"
    data_files: list[str] = field(default_factory=list)
    dynamic_batch: bool = True
    export_batch: int | None = None
    opset: int | None = None

    def expected(self) -> str:
        """Human-readable list of the inputs a call needs, for error messages."""
        pos = ", ".join(self.arg_names)
        kw = ", ".join(f"{n}=" for n in self.kwarg_names)
        return f"({', '.join(s for s in (pos, kw) if s)})"

    def flatten_call(self, args: tuple, kwargs: dict) -> list[Any]:
        """Flatten a call's inputs into export order, or say which inputs were expected.

        Accepts each input positionally or by name, like the module's own ``forward``; keyword
        order does not matter (it is restored to the export order before flattening).
        """
        names = self.arg_names + self.kwarg_names
        if len(args) > len(names):
            raise CaptureError(
                f"got {len(args)} positional inputs but the model takes {self.expected()}"
            )
        values = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise CaptureError(
                    f"unknown input {key!r}; the exported model takes {self.expected()}"
                )
            if key in values:
                raise CaptureError(f"input {key!r} given twice; the model takes {self.expected()}")
            values[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise CaptureError(f"missing inputs {missing}; the exported model takes {self.expected()}")
        tree = (tuple(values[n] for n in self.arg_names), {n: values[n] for n in self.kwarg_names})
        leaves, spec = _compat.tree_flatten(tree)
        if spec != self.in_spec:
            raise CaptureError(
                f"input structure differs from the export: expected {self.in_spec}, got {spec}; "
                f"the exported model takes {self.expected()}"
            )
        return leaves

    def unflatten_outputs(self, leaves: list[Any]) -> Any:
        """Rebuild the original output structure (e.g. ``ImageClassifierOutput``)."""
        return _compat.tree_unflatten(list(leaves), self.out_spec)

    def to_json(self) -> str:
        """JSON text with the specs serialised by pytree (registered ModelOutput types included)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)} | {
            "version": IO_VERSION,
            "in_spec": _compat.treespec_dumps(self.in_spec),
            "out_spec": _compat.treespec_dumps(self.out_spec),
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> OnnxIO:
        """Inverse of :meth:`to_json`; rejects files written by a newer tcompile."""
        data = json.loads(text)
        version = data.pop("version", None)
        if version != IO_VERSION:
            raise ValueError(f"{IO_FILE} has version {version}, this tcompile reads {IO_VERSION}")
        data["in_spec"] = _compat.treespec_loads(data["in_spec"])
        data["out_spec"] = _compat.treespec_loads(data["out_spec"])
        return cls(**data)
