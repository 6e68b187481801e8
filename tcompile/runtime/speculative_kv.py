"""KV eviction composed with speculative decoding: only accepted entries enter the budget.

The verify step writes every draft entry after the row's last one (a scratch region of T slots
past the budget); rejected entries are dropped by bookkeeping as usual. Each accepted entry is
then booked in order as if a decode step had produced it: the KV policy admits it, re-ranks the
row's entries (with that token's own attention scores, for H2O and TOVA), and when the row holds
more than ``capacity`` entries the new entry moves over the lowest-ranked one of each layer and
KV head (a copy of one entry per layer, as ``book`` lets the next decode step overwrite it), and
its scratch slot is freed. Memory stays at capacity + T slots for any output length.

One difference from plain evicting decoding remains by construction: the draft tokens of a step
attend to the cache as it was before the step's evictions (they are scored together).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.fx

from tcompile import _compat
from tcompile.analysis.graph_utils import SDPA_OPS, sdpa_operands
from tcompile.cost.flops import traced_cost
from tcompile.passes.kv_eviction import KVPolicy


def attention_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                   kv_heads: int) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) for every query, averaged over each KV head's query group:
    [B, kv_heads, T, N_keys] in float32."""
    b, h, t, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = torch.matmul(q.reshape(b, hk, (h // hk) * t, d), k.transpose(-1, -2)) * scale
    logits = logits.reshape(b, hk, h // hk, t, nk)
    if mask is not None:
        logits = logits + mask[:, :, None]            # [B, 1, 1, T, N]
    probs = logits.float().softmax(dim=-1).mean(dim=2)     # [B, hk, T, N]
    if hk != kv_heads:
        probs = probs.reshape(b, kv_heads, hk // kv_heads, t, nk).mean(dim=2)
    return probs


attention_rows.__tcompile_cost__ = traced_cost(attention_rows)   # tens of ops per call, not one


def expose_attention_rows(gm: torch.fx.GraphModule, kv_heads: int) -> torch.fx.GraphModule:
    """A copy of a verify graph with one :func:`attention_rows` output per SDPA node."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    added = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_OPS:
            continue
        q, k, mask, _, scale = sdpa_operands(node)
        with gm.graph.inserting_after(node):
            added.append(gm.graph.call_function(attention_rows, (q, k, mask, scale, kv_heads)))
    _compat.append_graph_outputs(gm, added)
    return gm


def _move(t: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, dim: int) -> None:
    """In place: t[..., dst, ...] = t[..., src, ...] along ``dim``, per row; ``src``/``dst``
    shaped like ``t`` with size 1 at ``dim``."""
    t.scatter_(dim, dst, t.gather(dim, src))


def evict_accepted(cache: object, policy: KVPolicy, capacity: int, slots: torch.Tensor, paths: list[list[int]],
                   scores: list[torch.Tensor]) -> None:
    """Book the accepted entries of a step (already committed at ``slots[:, :n]``) one by one,
    evicting over the budget. ``scores``: per layer [B, Hkv, T, S] (empty if the policy needs none)."""
    b, t = slots.shape
    n = torch.tensor([len(p) for p in paths])
    if int(n.max()) == 0:
        return
    layers, heads, s = cache.pos.shape[1], cache.pos.shape[2], cache.pos.shape[3]
    seen0 = cache.seen - n
    arange = torch.arange(s)
    for j in range(int(n.max())):
        active = j < n
        src = slots[:, j]
        written = (arange == src[:, None, None, None]) & active[:, None, None, None]   # [B, L, Hkv, S]
        step_scores = None
        if scores:
            # the query of the j-th accepted node (its key columns over this step's scratch slots
            # are those before a tree path's compaction: only the credit between new entries shifts)
            query = torch.tensor([p[j] if j < len(p) else 0 for p in paths])
            rows = torch.stack([sc[torch.arange(b), :, query] for sc in scores], dim=1)   # [B, L, Hkv, S]
            step_scores = rows * active[:, None, None, None]
        if cache.state is not None or policy.decode_scores:
            cache.state = policy.admit(cache.state, written)
        future = torch.zeros(b, s, dtype=torch.bool)
        if j + 1 < t:
            later = torch.arange(t)[None] > j
            future.scatter_(1, slots, later & (torch.arange(t)[None] < n[:, None]))
        priority, state = policy.decode(step_scores, cache.pos, seen0 + j + 1, cache.state, capacity)
        if cache.state is not None:
            cache.state = torch.where(active[:, None, None, None], state, cache.state)
        over = active & (cache.valid.sum(dim=1) - future.sum(dim=1) > capacity)
        if not bool(over.any()):
            continue
        victims = priority.masked_fill(~cache.valid[:, None, None, :] | future[:, None, None, :], float("inf")).argmin(-1)
        victims = torch.where(over[:, None, None], victims, src[:, None, None].expand(b, layers, heads))
        for layer in range(layers):
            dst = victims[:, layer]                                      # [B, Hkv]
            for buf in cache.kv[2 * layer: 2 * layer + 2]:
                d = buf.shape[-1]
                _move(buf, src[:, None, None, None].expand(b, heads, 1, d), dst[:, :, None, None].expand(b, heads, 1, d), 2)
        src4 = src[:, None, None, None].expand(b, layers, heads, 1)
        _move(cache.pos, src4, victims[..., None], 3)
        if cache.state is not None:
            _move(cache.state, src4, victims[..., None], 3)
        freed = over[:, None] & (arange[None] == src[:, None])
        cache.valid &= ~freed
        cache.pos.masked_fill_(freed[:, None, None, :], -1)   # heads whose victim was the new entry drop it
