"""Predicted vs measured latency per block (transformer layer) of a graph, for the report.

Why per block: a plan's total can match while its parts do not (e.g. the model under-prices the
layers after a merge and over-prices the head); the per-block table shows where the cost model
is wrong, which is what a user checks before trusting a plan for another device.

Blocks come from each node's ``nn_module_stack`` (export records the module path a node was
traced in): the first path component ending in ``layer.N`` / ``layers.N`` / ``blocks.N`` /
``h.N`` names its block; nodes outside any layer (embeddings, head, and nodes a pass inserted
without a stack) group as ``other``. Measured times come from running the graph node by node
(an ``fx.Interpreter`` with a clock per node): the interpreter's own overhead is included, so
compare blocks with each other, and the total with the plain run's latency.
"""
from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from tcompile.cost.flops import call_nodes, graph_cost
from tcompile.cost.model import node_dtype, predict_node_seconds

_BLOCK = re.compile(r"(?:^|\.)((?:layers?|blocks|h)\.\d+)(?:\.|$)")


def block_of(node: fx.Node) -> str:
    """The block a node belongs to, e.g. ``encoder.layer.3``; ``other`` outside every layer."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        match = _BLOCK.search(str(path))
        if match:
            return str(path)[:match.end(1)]
    return "other"


def predicted_blocks(gm: fx.GraphModule, profile: Any) -> dict[str, float]:
    """Predicted seconds per block (the cost model's node times, summed by block)."""
    by_name = dict(call_nodes(gm))
    out: dict[str, float] = defaultdict(float)
    for name, cost in graph_cost(gm).nodes:
        node = by_name[name]
        out[block_of(node)] += predict_node_seconds(cost, node_dtype(node), profile)
    return dict(out)


class _Clock(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seconds: dict[str, float] = defaultdict(float)

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        started = time.perf_counter()
        out = super().run_node(n)
        self.seconds[block_of(n)] += time.perf_counter() - started
        return out


def measured_blocks(gm: fx.GraphModule, args: tuple, kwargs: dict, repeats: int = 3) -> dict[str, float]:
    """Median seconds per block over ``repeats`` node-by-node runs (after one warm-up run)."""
    spec = getattr(gm, "_in_spec", None)      # an exported module's flat input order
    flat = fx_pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None else [*args, *kwargs.values()]
    runs = []
    with torch.no_grad():
        for i in range(repeats + 1):
            clock = _Clock(gm)
            clock.run(*flat)
            if i:
                runs.append(clock.seconds)
    return {b: statistics.median(r.get(b, 0.0) for r in runs) for b in runs[0]}


def block_table(gm: fx.GraphModule, args: tuple, kwargs: dict, profile: Any, repeats: int = 3
                ) -> list[dict[str, Any]]:
    """Rows ``{"part", "predicted_s", "measured_s"}`` per block, in graph order, ``other`` last."""
    predicted = predicted_blocks(gm, profile)
    measured = measured_blocks(gm, args, kwargs, repeats)
    order = list(dict.fromkeys(block_of(n) for n in gm.graph.nodes if n.op == "call_function"))
    order = [b for b in order if b != "other"] + (["other"] if "other" in order else [])
    return [{"part": b, "predicted_s": predicted.get(b, 0.0), "measured_s": measured.get(b, 0.0)} for b in order]
