"""Export layout ``triton-server``: a Triton Inference Server model repository for the engine file.

Serving at scale (dynamic batching, concurrent model instances, HTTP/gRPC, metrics) is Triton's
job, so tcompile writes what Triton reads::

    <repo>/<name>/config.pbtxt       inputs, outputs, max_batch_size, dynamic_batching, platform
    <repo>/<name>/1/model.onnx       (platform onnxruntime_onnx; + external data files)
    <repo>/<name>/1/model.plan       (platform tensorrt_plan)

Inputs and outputs come from the engine file itself (the ONNX graph's value infos), so the
config cannot drift from what the server loads. When dim 0 of every input and output is the
symbolic batch, Triton owns that dim: ``max_batch_size`` is set, the dims listed omit it and
``dynamic_batching`` is on; other symbolic dims are ``-1``.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from tcompile.errors import ArtifactError, BackendUnavailableError

PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
# ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                  11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
TORCH_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                   "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                   "bool": "TYPE_BOOL"}


def _onnx_tensors(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of an ONNX file: name, Triton type, dims (None for a symbolic dim)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def tensors(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out.append({"name": v.name, "data_type": ONNX_TO_TRITON.get(t.elem_type, f"UNKNOWN_{t.elem_type}"),
                        "dims": dims, "symbols": [d.dim_param for d in t.shape.dim]})
        return out
    return tensors(model.graph.input), tensors(model.graph.output)


def _plan_tensors(directory: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of a torch-tensorrt artifact, from its exported program's signature."""
    import torch

    program = torch.export.load(str(directory / "model.ep"))
    nodes = {n.name: n for n in program.graph.nodes}

    def entry(name: str, val: Any) -> dict[str, Any]:
        dims = [int(d) if isinstance(d, int) else None for d in val.shape]
        dtype = str(val.dtype).removeprefix("torch.")
        return {"name": name, "data_type": TORCH_TO_TRITON.get(dtype, dtype), "dims": dims,
                "symbols": ["batch" if d is None and i == 0 else "" for i, d in enumerate(dims)]}
    inputs = [entry(n, nodes[n].meta["val"]) for n in program.graph_signature.user_inputs]
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = [entry(f"output_{i}", a.meta["val"]) for i, a in enumerate(out_node.args[0])]
    return inputs, outputs


def _block(kind: str, tensors: list[dict[str, Any]], drop_batch: bool) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = t["dims"][1:] if drop_batch else t["dims"]
        dims_text = ", ".join("-1" if d is None else str(d) for d in dims)
        lines += ["  {", f'    name: "{t["name"]}"', f"    data_type: {t['data_type']}", f"    dims: [ {dims_text} ]",
                  "  }" + ("," if i < len(tensors) - 1 else "")]
    return lines + ["]"]


def config_text(name: str, platform: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                max_batch_size: int) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ModelConfig)."""
    batched = all(t["dims"] and t["dims"][0] is None for t in inputs + outputs)
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size if batched else 0}"]
    lines += _block("input", inputs, batched) + _block("output", outputs, batched)
    if batched:
        lines += ["dynamic_batching { }"]
    lines += ["instance_group [ { count: 1, kind: KIND_" + ("GPU" if platform == "tensorrt_plan" else "CPU") + " } ]"]
    return "\n".join(lines) + "\n"


def check_layout(backend: str) -> None:
    """Only ONNX and TensorRT engines have a Triton platform here; say what to do otherwise."""
    if backend not in PLATFORMS:
        raise BackendUnavailableError(
            f"layout 'triton-server' serves ONNX or TensorRT engines, but this model was lowered with backend "
            f"{backend!r}; re-run tcompile.optimize with backend='onnxruntime' (or 'tensorrt' on a CUDA machine) "
            "or export with the default layout")


def write_repository(source: Path, backend: str, repo: Path, name: str, max_batch_size: int = 64) -> Path:
    """Write ``repo/name/{config.pbtxt,1/model.*}`` from the engine files of a saved runner in ``source``."""
    check_layout(backend)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"Triton model name {name!r} must be letters, digits, '_', '.' or '-'")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    platform, model_file = PLATFORMS[backend]
    if not (source / model_file).is_file():
        raise ArtifactError(f"{source} holds no {model_file}: a {backend} engine that is not one file (e.g. TensorRT "
                            "with PyTorch fallback partitions) cannot be served by Triton's "
                            f"{platform} platform; remove the custom-op passes or use the default layout")
    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if backend == "onnxruntime":
        inputs, outputs = _onnx_tensors(source / model_file)
        for f in source.iterdir():   # model.onnx and any external-data files it names
            if f.name.startswith("model.onnx"):
                shutil.copy2(f, version_dir / f.name)
    else:
        inputs, outputs = _plan_tensors(source)
        shutil.copy2(source / model_file, version_dir / model_file)
    (repo / name / "config.pbtxt").write_text(config_text(name, platform, inputs, outputs, max_batch_size))
    return repo / name
