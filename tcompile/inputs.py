"""The calling convention of captured programs: input names, batching and dynamic shapes.

Capture, the eager artifact and the ONNX exporter all export with the same convention: dim 0
of every tensor input whose dim 0 equals the example batch is one symbolic ``batch``; a batch of
1 is repeated to 2 first, since export would specialise it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from tcompile import _compat
from tcompile.errors import CaptureError

MAX_BATCH = 4096


def batch_dim() -> Any:
    """The shared symbolic batch (min 1: the rewritten graphs must also serve a batch of one)."""
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def call_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list[str], list[str]]:
    """Names for the positional slots and the keywords of an export call.

    Positional slots take the module's ``forward`` parameter names when it has plain ones (a
    module from ``ExportedProgram.module()`` does), so callers may pass them by name as well.
    Keywords are put in ``forward``'s order, so the export does not depend on dict order.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[: len(args)])
    if plain and len(params) >= len(args):
        arg_names = [p.name for p in params[: len(args)]]
    else:
        arg_names = [f"arg{i}" for i in range(len(args))]
    clash = sorted(set(arg_names) & set(kwargs))
    if clash:
        raise CaptureError(f"inputs {clash} were given both positionally and by keyword")
    order = {p.name: i for i, p in enumerate(params)}
    return arg_names, sorted(kwargs, key=lambda n: order.get(n, len(order)))


def _is_batched(leaf: Any, batch: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 and leaf.shape[0] == batch


def _map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    leaves, spec = _compat.tree_flatten(tree)
    return _compat.tree_unflatten([fn(x) for x in leaves], spec)


def batch_inputs(
    arg_names: list[str], args: tuple, kwargs: dict, dynamic: bool
) -> tuple[tuple, dict, dict[str, Any] | None, int | None]:
    """Export inputs, ``dynamic_shapes`` (keyed by input name) and the export batch.

    The batch is dim 0 of the first tensor input; every tensor input with that dim 0 gets the
    shared ``Dim("batch")``. A batch of 1 would be specialised by the exporter, so it is
    repeated to 2 first (a tensor whose dim 0 is 1 for another reason is repeated too).
    """
    batch = next((int(x.shape[0]) for x in _compat.tree_flatten((args, kwargs))[0]
                  if isinstance(x, torch.Tensor) and x.ndim >= 1), None)
    if not dynamic or batch is None:
        return args, kwargs, None, batch
    if batch == 1:
        args, kwargs = _map_leaves(lambda t: torch.cat([t, t]) if _is_batched(t, 1) else t, (args, kwargs))
        batch = 2
    dim = batch_dim()
    values = dict(zip(arg_names, args)) | kwargs
    shapes = {n: _map_leaves(lambda t: {0: dim} if _is_batched(t, batch) else None, v) for n, v in values.items()}
    return args, kwargs, shapes, batch
