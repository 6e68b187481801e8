"""Analytic FLOP and byte counts for the nodes of a captured (torch.export / FX) graph.

Why analytic: the planner prices many candidate rewrites without running them, so each node is
costed from the FakeTensors in ``node.meta["val"]``; SymInt dims resolve to their hints or to given
``sizes``, so one dynamic-batch export prices any batch. A multiply-add is 2 FLOPs, a bias add or a
pointwise op 1 per output element (but see ``POINTWISE_FLOPS``). ``bytes`` is what eager FX moves:
inputs read plus outputs written, a stride-0 dim once. Aliasing ops (view, transpose, slice) cost
nothing: the consumer pays for reading. ``ops`` counts dispatches, for the fixed per-op cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from tcompile.cost.probe import Probe

KINDS = ("matmul", "attention", "sparse_attention", "elementwise", "reduction", "data", "view", "other")
#: FLOPs per output element of pointwise functions that cost more than one arithmetic op.
POINTWISE_FLOPS: dict[str, float] = {"exp": 4, "exp2": 4, "expm1": 4, "log": 4, "log1p": 4,
    "log2": 4, "sin": 4, "cos": 4, "tan": 4, "tanh": 4, "erf": 4, "erfc": 4, "sigmoid": 4,
    "softplus": 6, "elu": 5, "selu": 5, "celu": 5, "silu": 5, "gelu": 8, "mish": 12, "logit": 5}
SOFTMAX_FLOPS_PER_ELEM = 8.0  # max, subtract, exp (4), sum, divide
LAYER_NORM_FLOPS_PER_ELEM = 5.0  # mean, subtract, square, sum, scale by rstd
RMS_NORM_FLOPS_PER_ELEM = 3.0  # square, sum, scale by rstd
AFFINE_FLOPS_PER_ELEM = 1.0  # per affine tensor (weight, bias) of a norm
SDPA_MASK_FLOPS_PER_SCORE = 1.0  # applying attn_mask to each score


def _names(text: str) -> set[str]:
    return set(text.split())


_MATMUL = _names("mm bmm matmul mv dot vdot addmm baddbmm addmv linear")
_CONV = _names("conv1d conv2d conv3d convolution") | {f"conv_transpose{i}d" for i in (1, 2, 3)}
_ATTENTION = _names(  # all take [..., heads, tokens, head_dim] query/key/value
    "scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu "
    "_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_cudnn_attention")
_NORMS = {**dict.fromkeys(_names("layer_norm native_layer_norm group_norm native_group_norm "
                                 "batch_norm instance_norm"), LAYER_NORM_FLOPS_PER_ELEM),
          **dict.fromkeys(_names("rms_norm _fused_rms_norm"), RMS_NORM_FLOPS_PER_ELEM),
          "_native_batch_norm_legit_no_training": 2.0}
_SOFTMAX = _names("softmax _softmax log_softmax _log_softmax _safe_softmax")
_POINTWISE = set(POINTWISE_FLOPS) | _names(
    "add sub rsub mul div true_divide floor_divide remainder fmod neg abs pow sqrt rsqrt reciprocal"
    " square relu relu6 leaky_relu hardtanh hardswish hardsigmoid threshold clamp clamp_min"
    " clamp_max clip maximum minimum where masked_fill eq ne lt le gt ge logical_and logical_or"
    " logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__"
    " __invert__ sign floor ceil round trunc lerp addcmul addcdiv fill triu tril isnan diff glu")
_REDUCTIONS = {**dict.fromkeys(_names("sum mean amax amin max min prod argmax argmin any all "
                                      "count_nonzero cumsum cumprod"), 1.0), "logsumexp": 6.0,
               **dict.fromkeys(_names("norm linalg_vector_norm var std var_mean std_mean"), 2.0)}
_VIEWS = _names(  # dropout: inference graphs only; the last five copy only sometimes (_copies)
    "view _unsafe_view _reshape_alias transpose permute expand expand_as unsqueeze squeeze t"
    " unflatten detach alias lift_fresh view_as sym_size sym_stride sym_numel sym_storage_offset"
    " slice select narrow split split_with_sizes chunk unbind tensor_split as_strided diagonal"
    " movedim swapaxes unfold _assert_tensor_metadata _assert_scalar _assert_async"
    " sym_constrain_range sym_constrain_range_for_size dropout feature_dropout alpha_dropout"
    " native_dropout contiguous to type_as reshape flatten")
_GATHERS = _names("embedding gather index index_select take take_along_dim")
_CREATES = _names("arange full zeros ones empty empty_like zeros_like ones_like full_like "
                  "new_zeros new_ones new_empty new_full scalar_tensor linspace empty_strided")
_DATA = _GATHERS | _CREATES | _names(
    "embedding_bag scatter scatter_add scatter_reduce index_put index_add index_copy index_fill"
    " masked_scatter masked_select nonzero topk sort argsort cat concat stack clone copy _to_copy"
    " repeat repeat_interleave tile flip roll pad constant_pad_nd one_hot item _local_scalar_dense"
    " select_scatter slice_scatter unique _unique2 lift_fresh_copy")


@dataclass(frozen=True)
class NodeCost:
    """What one node costs: FLOPs, bytes moved, its kind, and how many ops it dispatches; a
    ``probe`` when the node is priced by timing it on the device (see :mod:`tcompile.cost.probe`)."""

    flops: float
    bytes: float
    kind: str
    ops: float = 1.0
    probe: Probe | None = None


ZERO_COST = NodeCost(0.0, 0.0, "view", 0.0)


@dataclass
class SizeResolver:
    """Turns ints and SymInts into ints: caller overrides by symbol name first, then hints."""

    sizes: Mapping[str, int] = field(default_factory=dict)

    def __call__(self, v: Any) -> int:
        if not isinstance(v, torch.SymInt):
            return int(v)
        node, expr = v.node, v.node.expr
        subs = {s: self.sizes[s.name] for s in expr.free_symbols if s.name in self.sizes}
        if not subs and node.hint is not None:
            return int(node.hint)
        expr = expr.subs(subs)
        hint = expr if expr.is_number else node.shape_env.size_hint(expr, allow_none=True)
        if hint is None:  # unbacked (data-dependent) size: a finite upper bound, else 1
            hint = node.shape_env.bound_sympy(expr).upper
            hint = hint if hint.is_Integer and int(hint) < 2**31 else 1
        return int(hint)


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _tensors(x: Any) -> list[torch.Tensor]:
    leaves = tree_leaves(x, is_leaf=lambda v: isinstance(v, fx.Node))
    return [t for t in map(_val, leaves) if isinstance(t, torch.Tensor)]


def _numel(t: torch.Tensor, S: SizeResolver) -> int:
    return math.prod(S(d) for d in t.shape)


def _nbytes(t: torch.Tensor, S: SizeResolver) -> float:
    """Bytes of the distinct elements: a stride-0 (expanded) dim holds one copy of the data."""
    n = math.prod(S(d) for d, st in zip(t.shape, t.stride()) if S(st) != 0)
    return float(n * t.element_size())


def _copies(name: str, x: torch.Tensor, out: torch.Tensor, S: SizeResolver) -> bool:
    """Whether an aliasing op (reshape, contiguous, to) must copy here: torch decides, on meta."""
    if name in ("to", "type_as"):
        return out.dtype != x.dtype or out.device != x.device
    meta = torch.empty_strided([S(d) for d in x.shape], [S(s) for s in x.stride()],
                               dtype=x.dtype, device="meta")
    try:  # each aliases exactly when a view can express it; contiguous() when flat already
        meta.view(-1 if name == "contiguous" else [S(d) for d in out.shape])
        return False
    except RuntimeError:
        return name in ("reshape", "flatten", "contiguous")


def _bind(node: fx.Node) -> dict[str, Any]:
    """Arguments by schema name (``weight``, ``is_causal`` ...), positional or keyword."""
    return {**dict(zip((a.name for a in node.target._schema.arguments), node.args)), **node.kwargs}


def op_name(node: fx.Node) -> str | None:
    """The aten base name of a node's op (``linear``), or None when it is not an aten op."""
    if not (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten"):
        return None
    name: str = node.target._opname
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name  # in-place twin


def _attention_flops(a: dict[str, Any], S: SizeResolver) -> float:
    """QK^T and PV matmuls, softmax and the mask, over the (query, key) pairs computed."""
    q, k, v = (_val(a[n]) for n in ("query", "key", "value"))
    bh = math.prod(S(d) for d in q.shape[:-2])
    nq, nk, d, dv = S(q.shape[-2]), S(k.shape[-2]), S(q.shape[-1]), S(v.shape[-1])
    pairs = nq * nk
    if a.get("is_causal", False):  # top-left aligned tril: query i sees keys 0..i
        pairs = nq * (nq + 1) // 2 if nq <= nk else nk * (nk + 1) // 2 + (nq - nk) * nk
    mask = SDPA_MASK_FLOPS_PER_SCORE * (a.get("attn_mask", a.get("attn_bias")) is not None)
    return bh * pairs * (2.0 * d + 2.0 * dv + SOFTMAX_FLOPS_PER_ELEM + mask)


def _matmul_flops(name: str, node: fx.Node, out_t: torch.Tensor, S: SizeResolver) -> float:
    """2*out*K for products, 2*out*Cin/groups*kh*kw for convolutions, 1 per output for bias."""
    a, out = _bind(node), _numel(out_t, S)
    bias = out * (a.get("bias") is not None or name in ("addmm", "baddbmm", "addmv"))
    if name in _CONV:  # weight [Cout, Cin/groups, *k], or [Cin, Cout/groups, *k] if transposed
        x, w = _val(a["input"]), _val(a["weight"])
        transposed = bool(a.get("transposed", False)) or name.startswith("conv_transpose")
        per = math.prod(S(d) for d in w.shape[1:])
        return 2.0 * (_numel(x, S) if transposed else out) * per + bias
    first = _val(a.get("input", a.get("mat1", a.get("batch1", a.get("mat", a.get("self"))))))
    return 2.0 * out * (S(first.shape[-1]) if first.dim() > 0 else 1) + bias


def _aten_cost(name: str, node: fx.Node, S: SizeResolver) -> NodeCost | None:
    """Cost by op family; None when no rule knows ``name``."""
    outs, ins = _tensors(node.meta.get("val")), _tensors((node.args, node.kwargs))
    out_b = sum(_nbytes(t, S) for t in outs)
    io = sum(_nbytes(t, S) for t in ins) + out_b
    out_n = float(_numel(outs[0], S)) if outs else 0.0
    if name in _VIEWS:
        copies = bool(ins and outs) and _copies(name, ins[0], outs[0], S)
        return NodeCost(0.0, io, "data") if copies else NodeCost(0.0, 0.0, "view")
    if name in _ATTENTION:
        return NodeCost(_attention_flops(_bind(node), S), io, "attention")
    if name in _MATMUL or name in _CONV:
        return NodeCost(_matmul_flops(name, node, outs[0], S), io, "matmul")
    if name in _NORMS:
        affine = sum(_bind(node).get(k) is not None for k in ("weight", "bias"))
        return NodeCost((_NORMS[name] + AFFINE_FLOPS_PER_ELEM * affine) * out_n, io, "elementwise")
    if name in _SOFTMAX or name in _POINTWISE:
        per = SOFTMAX_FLOPS_PER_ELEM if name in _SOFTMAX else POINTWISE_FLOPS.get(name, 1.0)
        return NodeCost(per * out_n, io, "elementwise")
    if name in _REDUCTIONS:
        return NodeCost(_REDUCTIONS[name] * (_numel(ins[0], S) if ins else out_n), io, "reduction")
    if name in _GATHERS:  # reads only the gathered rows (and the indices), not the whole table
        return NodeCost(0.0, 2 * out_b + sum(_nbytes(t, S) for t in ins[1:]), "data")
    if name in _DATA:
        return NodeCost(0.0, out_b if name in _CREATES else io, "data")
    return None


def _price(node: fx.Node, S: SizeResolver) -> tuple[NodeCost, bool]:
    """The node's cost, and whether a rule priced it (False: the unknown-op fallback)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return ZERO_COST, True
    hook: Callable[[fx.Node, SizeResolver], NodeCost] | None = getattr(node.target, "__tcompile_cost__", None)
    if hook is not None:
        return hook(node, S), True
    name, val = op_name(node), node.meta.get("val")
    cost = _aten_cost(name, node, S) if name is not None else None
    if cost is not None:
        return cost, True
    python_fn = name is None and node.op == "call_function" and not isinstance(
        node.target, torch._ops.HigherOrderOperator)  # HOPs (cond, wrap_*) hide sub-graphs
    plumbing = getattr(node.target, "__module__", None) in ("_operator", "math")
    if python_fn and (plumbing or not _tensors(val)):
        return ZERO_COST, True  # getitem, SymInt arithmetic: Python plumbing, no dispatch
    io = sum(_nbytes(t, S) for t in _tensors((node.args, node.kwargs, val)))
    return NodeCost(0.0, io, "other"), python_fn


def traced_cost(fn: Callable[..., Any]) -> Callable[[fx.Node, SizeResolver], NodeCost]:
    """A ``__tcompile_cost__`` hook for a pass's Python helper called as one graph node: the
    helper is traced (``make_fx``, on meta tensors of the node's inputs at the priced sizes) and
    costs what its aten ops cost, with one dispatch per op. Why: a helper such as the attention
    scores KV policies rank by dispatches tens of ops per call; priced as one node it looked
    free, and the policies that use it were predicted as fast as those that do not."""
    def hook(node: fx.Node, S: SizeResolver) -> NodeCost:
        from torch.fx.experimental.proxy_tensor import make_fx

        from tcompile.cost.model import VIEW_OVERHEAD_FRACTION

        def concrete(x: Any) -> Any:
            v = _val(x)
            if isinstance(v, torch.Tensor):
                return torch.empty([S(d) for d in v.shape], dtype=v.dtype, device="meta")
            return S(v) if isinstance(v, torch.SymInt) else v
        args = tree_map(concrete, node.args, is_leaf=lambda v: isinstance(v, fx.Node))
        kwargs = tree_map(concrete, node.kwargs, is_leaf=lambda v: isinstance(v, fx.Node))
        inner = graph_cost(make_fx(lambda *a: fn(*a, **kwargs))(*args))
        ops = sum(c.ops * (VIEW_OVERHEAD_FRACTION if c.kind == "view" else 1.0) for _, c in inner.nodes)
        return NodeCost(inner.flops, inner.bytes, "elementwise", ops)
    return hook


def node_cost(node: fx.Node, sizes: Mapping[str, int] | None = None) -> NodeCost:
    """The cost of one node, from its and its inputs' meta values; ``sizes`` maps symbols
    (``"s77"``) to values over the hints. A non-aten target (a pass's helper) may carry
    ``__tcompile_cost__(node, size) -> NodeCost`` (``size`` turns a dim, SymInt or int, into an int
    under ``sizes``); else it costs its inputs' and outputs' bytes."""
    return _price(node, SizeResolver(dict(sizes or {})))[0]


def dynamic_symbols(gm: fx.GraphModule | torch.export.ExportedProgram) -> dict[str, dict[str, Any]]:
    """The inputs' dynamic dims, ``{"s77": {"hint": 2, "dims": ["pixel_values.shape[0]"]}}``:
    how a caller learns which symbol to put in ``sizes`` for, say, the batch."""
    out: dict[str, dict[str, Any]] = {}
    for n in getattr(gm, "graph_module", gm).graph.nodes:
        shape = getattr(n.meta.get("val"), "shape", ()) if n.op == "placeholder" else ()
        for i, d in enumerate(shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                entry = out.setdefault(d.node.expr.name, {"hint": d.node.hint, "dims": []})
                entry["dims"].append(f"{n.name}.shape[{i}]")
    return out


@dataclass
class GraphCost:
    """Totals of a graph, the per-call-node list for breakdowns, and the ops no rule covered."""

    flops: float
    bytes: float
    nodes: list[tuple[str, NodeCost]]
    unknown: list[str] = field(default_factory=list)


def graph_cost(gm: fx.GraphModule | torch.export.ExportedProgram,
               sizes: Mapping[str, int] | None = None) -> GraphCost:
    """Sum of the call nodes' costs; ``sizes`` keys are symbols (``"s77"``) or input dims
    (``"pixel_values.shape[0]"``, see dynamic_symbols). An unknown key raises: a typo must not
    silently price the export-time shape."""
    gm = getattr(gm, "graph_module", gm)
    symbols = dynamic_symbols(gm) if sizes else {}
    dims = {d: sym for sym, info in symbols.items() for d in info["dims"]}
    bad = [k for k in sizes or {} if k not in symbols and k not in dims and not k.startswith("u")]
    if bad:
        raise ValueError(f"unknown sizes {bad}; the graph's dynamic dims: {dict(symbols)}")
    S = SizeResolver({dims.get(k, k): int(v) for k, v in (sizes or {}).items()})
    total = GraphCost(0.0, 0.0, [])
    for name, node in call_nodes(gm):
        cost, known_op = _price(node, S)
        total.nodes.append((name, cost))
        total.flops += cost.flops
        total.bytes += cost.bytes
        if not known_op:
            total.unknown.append(f"{name}: {node.target}")
    return total


def call_nodes(gm: fx.GraphModule, prefix: str = "") -> Iterator[tuple[str, fx.Node]]:
    """Call nodes by qualified name, sub-graphs of higher-order ops inlined (the
    ``wrap_with_set_grad_enabled`` export puts around no_grad code; both branches of a cond)."""
    for node in gm.graph.nodes:
        hop = isinstance(node.target, torch._ops.HigherOrderOperator)
        subs = [getattr(gm, str(a.target)) for a in node.args if hop and isinstance(a, fx.Node)
                and a.op == "get_attr" and isinstance(getattr(gm, str(a.target)), fx.GraphModule)]
        for sub in subs:
            yield from call_nodes(sub, f"{prefix}{node.name}.")
        if node.op.startswith("call_") and not subs:
            yield prefix + node.name, node


def by_kind(nodes: GraphCost | Iterable[tuple[str, NodeCost]]) -> dict[str, dict[str, float]]:
    """``{kind: {"flops", "bytes", "count"}}`` over every kind in KINDS (zeros included)."""
    out = {k: {"flops": 0.0, "bytes": 0.0, "count": 0.0} for k in KINDS}
    for _, c in nodes.nodes if isinstance(nodes, GraphCost) else nodes:
        row = out.setdefault(c.kind, {"flops": 0.0, "bytes": 0.0, "count": 0.0})
        for key, add in (("flops", c.flops), ("bytes", c.bytes), ("count", 1.0)):
            row[key] += add
    return out
