"""OptimizedModel: what ``tcompile.optimize`` returns and ``tcompile.load`` restores.

It is called like the original model (same arguments, same output fields), carries the report,
and exports a self-contained artifact directory: the backend's engine or program, a manifest
with versions, pipeline, budget, input specs and checksums, and the report in three formats.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tcompile.artifact import compatibility, read_manifest, staged_directory, write_manifest
from tcompile.errors import ArtifactError, TCompileError
from tcompile.inputs import MAX_BATCH
from tcompile.lowering import get_backend
from tcompile.report import Report


def input_specs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Shapes and dtypes of the example inputs, and the range of their one dynamic dim (dim 0, the batch)."""
    def spec(t: Any) -> Any:
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} if isinstance(t, torch.Tensor) else repr(t)
    return {"args": [spec(a) for a in args], "kwargs": {k: spec(v) for k, v in kwargs.items()},
            "dynamic_dims": {"0": "batch"}, "dynamic_ranges": {"batch": {"min": 1, "max": MAX_BATCH}}}


class OptimizedModel:
    """A lowered, rewritten model with its report."""

    def __init__(self, runner: Any, report: Report, *, backend: str, pipeline: str,
                 budget: dict | None, inputs: dict[str, Any], model_name: str, device: str = "cpu") -> None:
        self._runner = runner
        self.device = device
        self.report = report
        self.backend, self.pipeline, self.budget = backend, pipeline, budget
        self.input_specs, self.model_name = inputs, model_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            try:
                return self._runner(*args, **kwargs)
            except (RuntimeError, AssertionError, ValueError) as exc:
                if isinstance(exc, TCompileError):
                    raise
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "shape" in msg.lower() or "expected input" in msg.lower() or "guard" in msg.lower():
                    raise ValueError(
                        f"the inputs do not match the shapes {self.model_name} was compiled for "
                        f"({json.dumps(self.input_specs['kwargs'] or self.input_specs['args'])}; only dim 0, "
                        f"the batch, may vary): {msg}. Pad inputs to the compiled length or re-run "
                        "tcompile.optimize with example inputs of the new shape") from exc
                raise

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise TCompileError(f"generate() needs a causal LM captured with prefill/decode graphs; "
                            f"{self.model_name} was captured as an encoder. Call the model instead")

    def export(self, path: str | Path, layout: str = "artifact", *, name: str | None = None,
               max_batch_size: int = 64) -> Path:
        """Write the model to ``path`` (created; an existing artifact is replaced).

        ``layout="artifact"`` (default): a self-contained tcompile artifact that ``tcompile.load``
        reads: engine/program files, ``manifest.json`` (versions, device, pipeline, budget, input
        specs with dynamic ranges, checksums) and the report. ``layout="triton-server"``: a Triton
        Inference Server model repository ``path/<name>/{config.pbtxt,1/model.*}`` for an ONNX
        Runtime or TensorRT engine, batching up to ``max_batch_size``.
        """
        path = Path(path)
        if layout not in ("artifact", "triton-server"):
            raise ValueError(f"unknown export layout {layout!r}; use 'artifact' or 'triton-server'")
        if layout == "triton-server":
            return self._export_triton(path, name or _model_dir_name(self.model_name), max_batch_size)
        if path.exists() and any(path.iterdir()) and not (path / "manifest.json").exists():
            raise ArtifactError(f"{path} exists and is not a tcompile artifact; refusing to overwrite it. "
                                "Choose an empty or new directory")
        with staged_directory(path) as staging:
            files = list(self._runner.save(staging))
            for suffix in ("json", "md", "html"):
                self.report.save(staging / f"report.{suffix}")
                files.append(f"report.{suffix}")
            write_manifest(staging, files, {
                "model": self.model_name, "backend": self.backend, "pipeline": self.pipeline,
                "budget": self.budget, "target": self.report.target, "inputs": self.input_specs,
                "lowering": self.report.lowering, **compatibility(self.backend, self.device)})
        return path

    def _export_triton(self, path: Path, name: str, max_batch_size: int) -> Path:
        """Save the runner to a scratch folder, then lay its engine out as ``path/name``; a repository
        holds many models, so only ``name`` is replaced."""
        from tcompile.lowering.triton_server import check_layout, write_repository
        check_layout(self.backend)   # refuse before any work
        with tempfile.TemporaryDirectory(prefix="tcompile-triton-") as tmp:
            self._runner.save(Path(tmp))
            target = path / name
            if target.exists():
                shutil.rmtree(target)
            write_repository(Path(tmp), self.backend, path, name, max_batch_size)
        return target

    def __repr__(self) -> str:
        return f"OptimizedModel({self.model_name}, backend={self.backend}, pipeline={self.pipeline!r})"


def _model_dir_name(model_name: str) -> str:
    """A Triton model name from the model's name: letters, digits, '_', '.', '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_") or "model"


def load(path: str | Path) -> Any:
    """Load an artifact written by ``export`` (an OptimizedModel, or an OptimizedLM for a causal LM),
    verifying versions and checksums."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") == "causal_lm":
        from tcompile.runtime.lm_optimize import load_lm
        return load_lm(path, manifest)
    backend = get_backend(manifest.get("backend", ""))
    try:
        runner = backend.load(path)
    except TCompileError:
        raise
    except Exception as exc:
        raise ArtifactError(f"could not load the {backend.name} program in {path}: {type(exc).__name__}: {exc}. "
                            "Re-export the artifact with this version of tcompile") from exc
    report = Report.load(path) if (path / "report.json").exists() else Report(manifest.get("model", "model"),
                                                                              manifest.get("pipeline", ""))
    return OptimizedModel(runner, report, backend=backend.name, pipeline=manifest.get("pipeline", ""),
                          budget=manifest.get("budget"), inputs=manifest.get("inputs", {}),
                          model_name=manifest.get("model", "model"),
                          device=(manifest.get("device") or {}).get("type", "cpu"))

