"""Per-token state threaded through a reduced graph: sizes and the source map.

``sizes`` [B, N, 1] counts the original tokens each current token stands for (ToMe's size
tracking); a padding token starts at size 0, so padding needs no separate mask once the graph is
reduced: ``log(size)`` is ``-inf`` for pads and ``log(size)`` is exactly ToMe's proportional
attention bias for merged tokens. ``src_map`` [B, N0] gives, for each original token, the index
of the current token that holds it; gathering with it restores per-token outputs (unmerge).

These functions are inserted into graphs as ``call_function`` nodes, so they use only ops that
export to ONNX (no data-dependent shapes, no ``scatter_reduce``).
"""
from __future__ import annotations

import torch


def init_token_state(x: torch.Tensor, mask: torch.Tensor | None, need_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sizes from the key-validity of the first site's mask (1 real, 0 pad) and an identity map."""
    b, n = x.shape[0], x.shape[1]
    if mask is None:
        sizes = torch.ones(b, n, 1, dtype=x.dtype, device=x.device)
    else:
        row = mask[:, 0, 0, :] if mask.dim() == 4 else mask.reshape(mask.shape[0], -1)[:, -n:]
        valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
        sizes = valid.expand(b, n).to(x.dtype).unsqueeze(-1)
    src_map = torch.arange(n, device=x.device).unsqueeze(0).expand(b, n) if need_map else None
    return sizes, src_map


def size_bias(sizes: torch.Tensor, proportional: bool) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, N]: log(size) (proportional attention) or 0/-inf for pads."""
    s = sizes.squeeze(-1)
    if proportional:
        bias = torch.log(s)
    else:
        bias = torch.where(s > 0, torch.zeros_like(s), torch.full_like(s, float("-inf")))
    return bias[:, None, None, :]


def unmerge(x: torch.Tensor, src_map: torch.Tensor) -> torch.Tensor:
    """Per-token outputs at the original positions: each original token copies its group's vector."""
    return x.gather(1, src_map.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

