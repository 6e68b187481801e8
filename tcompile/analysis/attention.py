"""Attention-site analysis: where attention happens and the residual stream around it.

Recognises both forms torch.export produces for transformers models: the fused
``aten.scaled_dot_product_attention`` node (``attn_implementation="sdpa"``) and explicit
``matmul → (scale) → (+mask) → softmax → matmul`` (``"eager"``). For each site it records the
q/k/v tensors ([B, H, N, d]), the mask, the block's input stream, the stream after the attention
residual (where ToMe and EViT act), and the number of leading special tokens (CLS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from tcompile.analysis.graph_utils import (
    ADD_OPS, LINEAR_OPS, MATMUL_OPS, NORM_OPS, SDPA_OPS, SHAPE_OPS, SOFTMAX_OPS, aten, first_tensor_arg,
    is_call, output_nodes, sdpa_operands,
)
from tcompile.analysis.shapes import shape_of
from tcompile.errors import NoAttentionError
from tcompile.program import Program

_SCALE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}


@dataclass
class AttentionSite:
    """One attention call and the block structure around it."""

    index: int
    form: str                       # "sdpa" | "eager"
    attn: torch.fx.Node             # the SDPA node, or the softmax node
    q: torch.fx.Node                # [B, H, Nq, d]
    k: torch.fx.Node                # [B, Hkv, Nk, d]
    v: torch.fx.Node
    mask: torch.fx.Node | None      # attention mask as fed to the site (None when absent)
    out: torch.fx.Node              # the node producing the attention output [B, H, Nq, d]
    mask_add: torch.fx.Node | None  # eager form: the node adding the mask to the logits
    logits: torch.fx.Node | None    # eager form: scaled logits before the mask
    heads: int
    kv_heads: int
    head_dim: int
    q_tokens: int
    kv_tokens: int
    block_input: torch.fx.Node | None   # residual stream entering the block
    pre_norm: bool
    residual: torch.fx.Node | None      # residual stream after the attention residual add (+ norm if post-norm)
    token_axis: int = 1

    def describe(self) -> str:
        return (f"site {self.index}: {self.form} attention, {self.heads} heads ({self.kv_heads} kv), "
                f"d={self.head_dim}, tokens {self.q_tokens}x{self.kv_tokens}, "
                f"{'pre' if self.pre_norm else 'post'}-norm")


@dataclass
class AttentionAnalysis:
    sites: list[AttentionSite]
    leading_special: int            # leading special tokens (CLS, distill) that must never merge
    found_ops: dict[str, int]       # op histogram, for the "no attention" error message


def analyze_attention(program: Program) -> AttentionAnalysis:
    """Find every attention site; cached on the program as ``"attention"``."""
    return program.analysis("attention", _compute)


def require_attention(program: Program) -> AttentionAnalysis:
    """As :func:`analyze_attention`, but raise :class:`NoAttentionError` when there is none."""
    analysis = analyze_attention(program)
    if not analysis.sites:
        top = ", ".join(f"{k}×{v}" for k, v in sorted(analysis.found_ops.items(), key=lambda kv: -kv[1])[:8])
        raise NoAttentionError(
            f"no attention site found in {program.model_name}: the captured graph has no "
            f"scaled_dot_product_attention and no matmul→softmax→matmul pattern (ops found: {top}). "
            "tcompile's token rewrites need a transformer with attention; check that the right "
            "module was passed (e.g. the model, not a submodule without attention)"
        )
    return analysis


def per_token_outputs(program: Program) -> list[torch.fx.Node]:
    """Graph outputs shaped [B, N, ...] with N the tokens entering the first attention site
    (e.g. ``last_hidden_state``): a token rewrite must restore or knowingly change them."""
    n0 = require_attention(program).sites[0].q_tokens
    return [n for n in output_nodes(program.gm) if len(shape_of(n) or ()) >= 3 and shape_of(n)[1] == n0]


def _compute(program: Program) -> AttentionAnalysis:
    gm = program.gm
    sites: list[AttentionSite] = []
    hist: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            hist[name] = hist.get(name, 0) + 1
        site = None
        if is_call(node, SDPA_OPS):
            site = _sdpa_site(node, len(sites))
        elif is_call(node, SOFTMAX_OPS):
            site = _eager_site(node, len(sites))
        if site is not None:
            sites.append(site)
    return AttentionAnalysis(sites, _leading_special(gm, sites), hist)


def _site(index: int, form: str, attn, q, k, v, mask, out, mask_add=None, logits=None) -> AttentionSite | None:
    qs, ks = shape_of(q), shape_of(k)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return None
    block_input, pre_norm = _block_input(q)
    site = AttentionSite(index, form, attn, q, k, v, mask, out, mask_add, logits, heads=qs[1], kv_heads=ks[1],
                         head_dim=qs[3], q_tokens=qs[2], kv_tokens=ks[2], block_input=block_input,
                         pre_norm=pre_norm, residual=None)
    site.residual = _residual_after(out, block_input, pre_norm)
    return site


def _sdpa_site(node: torch.fx.Node, index: int) -> AttentionSite | None:
    q, k, mask, _, _ = sdpa_operands(node)
    v = node.args[2]
    return _site(index, "sdpa", node, q, k, v, mask if isinstance(mask, torch.fx.Node) else None, node)


def _eager_site(softmax: torch.fx.Node, index: int) -> AttentionSite | None:
    """Match ``matmul(q, kᵀ) [*|/ scale] [+ mask] → softmax → [dropout] → matmul(·, v)``."""
    cur = softmax.args[0]
    mask = mask_add = None
    while isinstance(cur, torch.fx.Node) and cur.op == "call_function":
        if cur.target in ADD_OPS and mask is None:
            a, b = cur.args[:2]
            if _reaches_matmul(a):
                mask, mask_add, cur = b, cur, a
            elif _reaches_matmul(b):
                mask, mask_add, cur = a, cur, b
            else:
                return None
        elif cur.target in _SCALE_OPS or cur.target in {aten._to_copy.default, aten.to.dtype}:
            cur = first_tensor_arg(cur)
        else:
            break
    if not is_call(cur, MATMUL_OPS):
        return None
    logits = mask_add.args[0] if mask_add is not None and mask_add.args[0] is not mask else (
        mask_add.args[1] if mask_add is not None else None)
    q, kt = cur.args[:2]
    k = _untranspose(kt)
    out = _probs_matmul(softmax)
    if k is None or out is None:
        return None
    v = out.args[1]
    return _site(index, "eager", softmax, _unscale(q), k, v, mask if isinstance(mask, torch.fx.Node) else None,
                 out, mask_add, logits)


def _reaches_matmul(node, depth: int = 4) -> bool:
    while isinstance(node, torch.fx.Node) and depth > 0:
        if is_call(node, MATMUL_OPS):
            return True
        if node.op != "call_function" or not (node.target in _SCALE_OPS or node.target in SHAPE_OPS):
            return False
        node, depth = first_tensor_arg(node), depth - 1
    return False


def _untranspose(kt: torch.fx.Node) -> torch.fx.Node | None:
    while is_call(kt, {aten.expand.default, aten.clone.default, aten.contiguous.default} | _SCALE_OPS):
        kt = first_tensor_arg(kt)
    if is_call(kt, {aten.transpose.int, aten.permute.default, aten.t.default}):
        return first_tensor_arg(kt)
    return None


def _unscale(q: torch.fx.Node) -> torch.fx.Node:
    while is_call(q, _SCALE_OPS | {aten.expand.default, aten.clone.default}):
        q = first_tensor_arg(q)
    return q


def _probs_matmul(softmax: torch.fx.Node) -> torch.fx.Node | None:
    frontier = [softmax]
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in n.users:
                if is_call(u, MATMUL_OPS) and u.args[0] is n:
                    return u
                if u.op == "call_function" and u.target in SHAPE_OPS | {aten.dropout.default}:
                    nxt.append(u)
        frontier = nxt
    return None


def _block_input(q: torch.fx.Node) -> tuple[torch.fx.Node | None, bool]:
    """Walk from q back through shape ops to its projection; the projection input is the stream
    (post-norm) or, behind a norm, the norm input is (pre-norm)."""
    cur = q
    for _ in range(16):
        if not isinstance(cur, torch.fx.Node) or cur.op != "call_function":
            return None, False
        if cur.target in LINEAR_OPS:
            x = first_tensor_arg(cur)
            # A pre-norm LN feeds only the projections; a post-norm LN output is itself the stream.
            if is_call(x, NORM_OPS) and all(is_call(u, LINEAR_OPS) for u in x.users):
                return first_tensor_arg(x), True
            return x, False
        if cur.target in SHAPE_OPS or cur.target in _SCALE_OPS:
            cur = first_tensor_arg(cur)
            continue
        return None, False
    return None, False


def _residual_after(out: torch.fx.Node, block_input: torch.fx.Node | None, pre_norm: bool) -> torch.fx.Node | None:
    """The stream right after ``block_input + attention(...)`` (and its norm for post-norm blocks)."""
    if block_input is None:
        return None
    frontier, seen = [out], set()
    for _ in range(24):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if is_call(u, ADD_OPS) and block_input in u.args[:2]:
                    if pre_norm:
                        return u
                    norms = [w for w in u.users if is_call(w, NORM_OPS)]
                    return norms[0] if len(norms) == 1 else None
                if u.op == "call_function" and (u.target in SHAPE_OPS or u.target in LINEAR_OPS):
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return None


def _leading_special(gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> int:
    """Count leading special tokens: a learned token concatenated in front of the patch tokens
    (ViT's CLS, DeiT's distill token), or token 0 read by a head (BERT's pooler)."""
    if not sites or sites[0].block_input is None:
        return 0
    cur = sites[0].block_input
    for _ in range(12):
        if is_call(cur, {aten.cat.default}):
            parts = cur.args[0]
            dim = cur.args[1] if len(cur.args) > 1 else 0
            if dim in (1, -2) and len(parts) >= 2:
                shapes = [shape_of(p) for p in parts]
                if all(s is not None for s in shapes):
                    return int(sum(s[1] for s in shapes[:-1]))
            break
        if not isinstance(cur, torch.fx.Node) or cur.op != "call_function":
            break
        cur = first_tensor_arg(cur)
    last = sites[-1].residual or sites[-1].block_input
    stream_nodes = [last] + list(last.users) if last is not None else []
    for n in list(stream_nodes) + output_nodes(gm):
        for u in list(n.users) if isinstance(n, torch.fx.Node) else []:
            if is_call(u, {aten.select.int}) and u.args[1] in (1, -2) and u.args[2] == 0:
                return 1
    return _reads_token_zero(gm)


def _reads_token_zero(gm: torch.fx.GraphModule) -> int:
    """A head that reads token 0 of a [B, N, C] tensor (pooler / classifier) makes it special."""
    for n in gm.graph.nodes:
        if is_call(n, {aten.select.int}) and n.args[1] in (1,) and n.args[2] == 0:
            src = shape_of(n.args[0])
            if src is not None and len(src) == 3:
                return 1
        if is_call(n, {aten.slice.Tensor}) and len(n.args) >= 4 and n.args[1] == 1 and n.args[2] == 0 \
                and n.args[3] == 1:
            src = shape_of(n.args[0])
            if src is not None and len(src) == 3:
                return 1
    return 0
