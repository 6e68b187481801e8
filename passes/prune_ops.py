"""Token pruning math: keep the top-k tokens by attention importance (EViT / VTC-CLS style).

Score: the attention the leading special token (CLS) pays to each token, averaged over heads
(EViT, Liang et al., ICLR 2022, ``youweiliang/evit``; VTC-CLS, ``THU-MIG/VTC-CLS``), or, for
models without a CLS token, the mean attention each token receives. Optionally the pruned tokens
are fused into one extra token, Σ a_i·x_i over the pruned set with EViT's raw (not renormalised)
weights. Kept tokens are re-sorted into their original order. Static k: topk + gather only.
"""
from __future__ import annotations

import math

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                    rows: int | None) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias) for the first ``rows`` queries (all when None), KV repeated for GQA."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    qq = q if rows is None else q[:, :, :rows]
    logits = (qq @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        logits = logits + (bias if bias.dtype != torch.bool else
                           torch.where(bias, 0.0, float("-inf")).to(logits.dtype))[..., :logits.shape[-2], :]
    acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    return logits.softmax(dim=-1, dtype=acc).to(q.dtype)


def importance(probs: torch.Tensor, protect: int) -> torch.Tensor:
    """[B, T] importance of the prunable tokens: CLS row when there is a CLS, else mean over rows."""
    if protect > 0:
        return probs[:, :, 0, protect:].mean(dim=1)
    return probs.mean(dim=(1, 2))


def prune_tokens(x: torch.Tensor, score: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                 keep: int, protect: int, fuse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep ``keep`` of the tokens after the protected ones, plus an optional fused token."""
    bsz, t = x.shape[0], x.shape[1] - protect
    valid = sizes[:, protect:, 0] > 0
    score = torch.where(valid, score, torch.full_like(score, -1.0))       # pads are pruned first
    idx = score.topk(keep, dim=-1).indices.sort(dim=-1).values           # [B, keep], original order
    body = x[:, protect:]
    kept = body.gather(1, idx.unsqueeze(-1).expand(-1, -1, body.shape[-1]))
    s_body = sizes[:, protect:]
    s_kept = s_body.gather(1, idx.unsqueeze(-1))
    x_parts, s_parts = [x[:, :protect], kept], [sizes[:, :protect], s_kept]
    pruned = torch.ones(bsz, t, dtype=x.dtype, device=x.device).scatter(1, idx, torch.zeros_like(idx, dtype=x.dtype))
    if fuse:
        w = (score.clamp_min(0) * pruned * valid.to(x.dtype)).unsqueeze(-1)
        x_parts.append((w * body).sum(dim=1, keepdim=True))
        s_parts.append((s_body * pruned.unsqueeze(-1)).sum(dim=1, keepdim=True))
    if src_map is not None:
        # Kept tokens move to protect + rank; pruned ones are represented by the fused token.
        if not fuse:
            raise ValueError("restoring per-token outputs after pruning needs the fused token (fuse=True)")
        ar = torch.arange(keep, device=x.device).unsqueeze(0).expand(bsz, keep) + protect
        pos = torch.full((bsz, t), protect + keep, dtype=torch.long, device=x.device).scatter(1, idx, ar)
        head = torch.arange(protect, device=x.device).unsqueeze(0).expand(bsz, protect)
        src_map = torch.cat([head, pos], dim=1).gather(1, src_map)
    return torch.cat(x_parts, dim=1), torch.cat(s_parts, dim=1), src_map
