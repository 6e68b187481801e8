"""Private torch APIs used by the core (to be merged into tcompile/_compat.py)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def flatten_inputs(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """Flatten (args, kwargs) the way torch.export's unlifted modules order their placeholders."""
    return pytree.tree_flatten((args, kwargs))


def tree_map_tensors(fn, tree: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a deep-copied graph that shares parameters with ``gm``.

    Unlifted exported modules keep their pytree specs in ``_in_spec``/``_out_spec`` and their
    generated ``forward`` reads them, so they must travel with the graph.
    """
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.meta.update(getattr(gm, "meta", {}))
    return new


def fake_propagate(gm: torch.fx.GraphModule, flat_inputs: list[Any]) -> None:
    """Record ``meta['val']`` (a FakeTensor) on every node, without running real kernels."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat_inputs]
    with mode:
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*fake_inputs)


def out_spec(gm: torch.fx.GraphModule) -> Any:
    return getattr(gm, "_out_spec", None)
