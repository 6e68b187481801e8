"""Shared test inputs and the dense-SDPA cross-check for the attention kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, device: torch.device,
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(b, h, n, d, generator=g).to(dtype).to(device)  # noqa: E731
    return mk(hq, nq), mk(hkv, nk), mk(hkv, nk)


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense SDPA (fp32) with the boolean mask, and the rows that see at least one key."""
    rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask.to(q.device), scale=scale)
    return out, mask.any(dim=-1)


def rel_err(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """max |out - ref| / max |ref| over the selected rows ([..., N] bool of rows to compare)."""
    out, ref = out.float(), ref.float()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    if ref.numel() == 0:
        return 0.0
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
