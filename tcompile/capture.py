"""Capture: ``torch.export`` (non-strict) of a user's model into a :class:`Program`.

The batch dimension is captured dynamic so one program serves any batch size; token counts stay
static, which is what lets rewrites use static keep counts that export to ONNX and TensorRT.
The user's model is never modified: its training flag is restored after capture.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from tcompile.analysis.shapes import propagate_shapes
from tcompile.canonicalize import drop_trivial_masks
from tcompile.errors import CaptureError
from tcompile.inputs import batch_inputs, call_names
from tcompile.program import Program

log = logging.getLogger(__name__)

def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs of type {type(example_inputs).__name__} is not supported: pass a tensor, "
        "a tuple of positional inputs, or a dict of keyword inputs (e.g. {'input_ids': ids})"
    )


def default_example_inputs(model: torch.nn.Module, batch: int = 2, seq_len: int = 128) -> dict:
    """Inputs derived from a transformers config, for when the user gives none."""
    config = getattr(model, "config", None)
    if config is None:
        raise CaptureError(
            f"{type(model).__name__} has no transformers config, so tcompile cannot guess its inputs; "
            "pass example_inputs=(tensor, ...) or example_inputs={'name': tensor}"
        )
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size)}
    if main == "input_ids":
        n = min(seq_len, getattr(config, "max_position_embeddings", seq_len) or seq_len)
        vocab = getattr(config, "vocab_size", 1000)
        gen = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (batch, n), generator=gen),
                "attention_mask": torch.ones(batch, n, dtype=torch.long)}
    raise CaptureError(f"cannot derive example inputs for main input {main!r}; pass example_inputs")


def capture(model: torch.nn.Module, example_inputs: Any = None, *, dynamic_batch: bool = True,
            name: str | None = None) -> Program:
    """Export ``model`` with torch.export (strict=False) and return a Program with shapes propagated.

    With ``dynamic_batch`` every tensor input's dim 0 is a shared symbolic batch. A batch of 1
    would be specialised by export, so such inputs are repeated to 2 for capture only.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    args, kwargs = normalize_inputs(example_inputs)
    arg_names, kwarg_names = call_names(model, args, kwargs)
    kwargs = {n: kwargs[n] for n in kwarg_names}
    cap_args, cap_kwargs, dynamic_shapes, _ = batch_inputs(arg_names, args, kwargs, dynamic_batch)
    dynamic_batch = dynamic_shapes is not None
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            ep = _export(model, cap_args, cap_kwargs, dynamic_shapes)
    finally:
        model.train(was_training)
    gm = ep.module()
    program = Program(gm, cap_args, cap_kwargs, name or type(model).__name__,
                      info={"dynamic_batch": dynamic_batch, "model_class": type(model).__name__})
    config = getattr(model, "config", None)
    if config is not None:
        program.info["model_type"] = getattr(config, "model_type", None)
        program.info["attn_implementation"] = getattr(config, "_attn_implementation", None)
    propagate_shapes(program)
    program.info["trivial_masks_removed"] = drop_trivial_masks(program)
    return program


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> Any:
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many types; the user needs the cause and a next step
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Check that example_inputs match the "
            "model's forward() and that the model runs in eval mode; models with data-dependent "
            "control flow need it removed or rewritten with torch.cond"
        ) from exc
