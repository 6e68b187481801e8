"""KV-cache eviction math: rank entries, keep the top ``capacity`` per KV head, gather.

Model-agnostic tensor functions (the analogue of kvpress's presses), shared by every KV policy
and traced into the exported decode step. A layer's cache is K, V [B, Hkv, C, d] with the
original position of each entry ``pos`` [B, Hkv, C] (-1: empty) and a validity mask ``valid``
[B, C] that is the same for every layer and head. Selection keeps that invariant: each head of a
row keeps min(capacity, valid entries of the row) valid entries, placed first, so validity stays
one [B, C] mask the attention of every layer can share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PROTECT = 1e9   # added to the priority of sinks and the recent window: always kept


def protect(priority: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Raise the first ``sinks`` real tokens and the last ``window`` tokens above any score.

    ``seen`` [B] counts real tokens so far; positions count real tokens, so with left padding the
    sinks are the first real tokens (StreamingLLM's requirement), not the pads.
    """
    seen = seen.view(-1, *([1] * (pos.dim() - 1)))
    keep = (pos >= 0) & ((pos < sinks) | (pos >= seen - window))
    return priority + keep.to(priority.dtype) * PROTECT


def select(priority: torch.Tensor, valid: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, Hkv, capacity] of the entries to keep (valid ones first, then by slot) and the
    new validity [B, capacity]."""
    c = priority.shape[-1]
    ranked = priority.masked_fill(~valid[:, None, :], float("-inf"))
    top = ranked.topk(capacity, dim=-1).indices
    kept_valid = valid[:, None, :].expand_as(ranked).gather(-1, top)
    order = (top + (~kept_valid).to(top.dtype) * c).argsort(dim=-1)
    n_valid = valid.sum(dim=1, keepdim=True).clamp_max(capacity)
    new_valid = torch.arange(capacity, device=valid.device)[None, :] < n_valid
    return top.gather(-1, order), new_valid


def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Entries ``idx`` [B, Hkv, C'] of a per-entry tensor [B, Hkv, C] or [B, Hkv, C, d]."""
    if t.dim() == 3:
        return t.gather(2, idx)
    return t.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))


def pool_scores(scores: torch.Tensor, kernel: int, mode: str, forward: bool = False) -> torch.Tensor:
    """SnapKV's smoothing of window votes along the keys (stride 1, same length).

    ``forward`` spreads each vote only to the ``kernel - 1`` entries after it (a one-sided window),
    so a voted phrase keeps its continuation: what copy/induction heads read next when the
    answer is generated.
    """
    if kernel <= 1:
        return scores
    b, h, n = scores.shape
    flat = scores.reshape(b * h, 1, n)
    pool = F.max_pool1d if mode == "max" else F.avg_pool1d
    if forward:
        fill = float("-inf") if mode == "max" else 0.0
        out = pool(F.pad(flat, (kernel - 1, 0), value=fill), kernel, stride=1)
    else:
        out = pool(flat, kernel, stride=1, padding=kernel // 2)
    return out.reshape(b, h, -1)[..., :n]
