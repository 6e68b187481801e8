"""Expose per-entry attention scores from captured causal-LM steps, for KV-cache policies.

KV policies rank cache entries by the attention they receive (H2O's accumulated attention,
SnapKV's observation window, TOVA's current query). Fused SDPA hides the probabilities, so this
rewrite adds, beside every ``scaled_dot_product_attention`` node, a call computing the softmax of
the last ``rows`` queries (all queries when ``rows`` is 0) over every key, summed over those
rows and averaged over the query heads that share a KV head: one [B, kv_heads, N_keys] tensor per
layer, appended to the graph's outputs in layer order. The SDPA output is untouched, so the
logits stay bit-identical. Only topk-friendly dense ops are used, so the graph still exports.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from tcompile import _compat
from tcompile.analysis.graph_utils import SDPA_OPS, sdpa_operands
from tcompile.cost.flops import traced_cost


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                     rows: int, kv_heads: int) -> torch.Tensor:
    """Σ over the last ``rows`` queries (0: all) of softmax(q·kᵀ·scale + mask), mean over each KV
    head's query group: [B, kv_heads, N_keys], in float32.

    ``k`` has either ``kv_heads`` heads (GQA left to SDPA) or as many heads as ``q`` (repeated
    by the model before SDPA); query head h belongs to KV head h // (H / kv_heads) either way.
    """
    b, h, _, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    qw = q[:, :, -rows:] if rows > 0 else q
    r = qw.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = torch.matmul(qw.reshape(b, hk, (h // hk) * r, d), k.transpose(-1, -2)) * scale   # [B, hk, g*r, Nk]
    if mask is not None:
        m = mask[:, :, -r:, :] if rows > 0 else mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=logits.dtype, device=m.device).masked_fill(~m, torch.finfo(logits.dtype).min)
        logits = logits + m.expand(b, -1, -1, -1).repeat(1, 1, h // hk, 1)
    probs = logits.float().softmax(dim=-1)
    if mask is not None:  # a padding query sees no key: its uniform row must not vote
        probs = probs * (logits > torch.finfo(logits.dtype).min / 2).any(dim=-1, keepdim=True)
    scores = probs.sum(dim=2)                                                  # [B, hk, Nk]
    if hk != kv_heads:
        scores = scores.reshape(b, kv_heads, hk // kv_heads, nk).sum(dim=2)
    return scores / (h // kv_heads)


attention_scores.__tcompile_cost__ = traced_cost(attention_scores)   # tens of ops per call, not one


def expose_attention_scores(gm: torch.fx.GraphModule, rows: int, kv_heads: int) -> int:
    """Add one :func:`attention_scores` output per SDPA node of ``gm``; returns how many."""
    added = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_OPS:
            continue
        q, k, mask, is_causal, scale = sdpa_operands(node)
        if mask is None and is_causal:
            raise ValueError(f"{node.name}: causal SDPA without an explicit mask; tcompile's LM steps always pass "
                             "one, so this graph was not captured by tcompile.runtime.capture_lm")
        with gm.graph.inserting_after(node):
            added.append(gm.graph.call_function(attention_scores, (q, k, mask, scale, rows, kv_heads)))
    _compat.append_graph_outputs(gm, added)
    return len(added)
