"""Next-token choice: greedy, or sampling with temperature, top-k and top-p.

The order and the tie rules follow transformers' logits warpers (temperature, then top-k, then
top-p keeping at least one token), so a seeded run is comparable with ``model.generate``.
"""
from __future__ import annotations

import torch


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 when sampling; use do_sample=False for greedy")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer (or None)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] (or None)")


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """[..., V] logits → warped float logits (-inf outside top-k / top-p), as transformers' warpers."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits → [B] token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = warp_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
