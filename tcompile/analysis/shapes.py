"""Shape propagation: every node gets ``meta['val']`` (a FakeTensor) for the example inputs.

Passes that change token counts re-run it, and the cost model and attention analysis read it.
"""
from __future__ import annotations

import torch

from tcompile import _compat as compat
from tcompile.program import Program


def propagate_shapes(program: Program) -> None:
    """Re-derive ``meta['val']`` on every node of ``program.gm`` (cheap: fake tensors only)."""
    compat.fake_propagate(program.gm, program.flat_inputs())


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The concrete shape of a node's tensor value, or None when it is not a tensor."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    return None
