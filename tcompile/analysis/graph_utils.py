"""Small helpers over torch.fx graphs shared by the analyses and the passes."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx

aten = torch.ops.aten

# Ops that only move or relabel data along the way from a projection to attention and back.
SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.t.default,
    aten.alias.default, aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.slice.Tensor, aten.dropout.default, aten._to_copy.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.flatten.using_ints,
    aten.unflatten.int, operator.getitem,
}
LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
ADD_OPS = {aten.add.Tensor, operator.add}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}


def sdpa_operands(node: torch.fx.Node) -> tuple[Any, Any, Any, bool, Any]:
    """(query, key, attn_mask, is_causal, scale) of an SDPA call node, given positionally or by
    keyword (aten's order: q, k, v, attn_mask, dropout_p, is_causal, scale)."""
    def arg(i: int, name: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
    return node.args[0], node.args[1], arg(3, "attn_mask", None), arg(5, "is_causal", False), arg(6, "scale", None)


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def is_call(node: Any, targets: Iterable[Any]) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def first_tensor_arg(node: torch.fx.Node) -> torch.fx.Node | None:
    for a in node.args:
        if isinstance(a, torch.fx.Node):
            return a
    return None


def output_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes that feed the graph's output, flattened."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat: list[torch.fx.Node] = []

    def walk(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)

    walk(out.args[0])
    return flat


def evaluate_constant(gm: torch.fx.GraphModule, node: torch.fx.Node, flat_inputs: list[Any]) -> Any:
    """Evaluate ``node`` when it depends on the inputs only through their sizes, else None.

    Used to recognise attention masks that are constant (e.g. all-True for a ViT), which hold
    no information but force a slower attention kernel and pin the token count.
    """
    anc = ancestors(node) | {node}
    for n in anc:
        if n.op == "placeholder" and any(u in anc and u.target is not aten.sym_size.int for u in n.users):
            return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n not in anc:
            continue
        if n.op == "placeholder":
            env[n] = flat_inputs[placeholders.index(n)]
        elif n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            env[n] = obj
        elif n.op == "call_function":
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        else:
            return None
    return env[node]
