"""Token merging math: ToMe's bipartite soft matching and PiToMe's energy-protected matching.

Pure, model-agnostic tensor functions (the analogue of ToMe's ``merge.py``). Each takes the
residual stream ``x`` [B, N, C], the block's keys ``k`` [B, H, N, d] as the similarity metric,
the token state (sizes, source map), the static number of merges ``r`` and the count of
leading special tokens ``protect`` that never merge, and returns the merged state with N - r
tokens. Everything is size-weighted: x' = Σ(s·x)/Σs, s' = Σs.

Papers: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), reference
``facebookresearch/ToMe``; Tran et al., "Accelerating Transformers with Spectrum-Preserving
Token Merging" (NeurIPS 2024), reference ``hchautran/PiToMe``.

Departure from ToMe: the protected tokens are set aside before the even/odd split (as PiToMe
does) instead of masking CLS's row, so any number of leading special tokens is supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tcompile.passes.token_state import weighted_average

_PAD_PRIORITY = 1e4  # pads (size 0) merge first: merging them changes nothing real


def _metric(k: torch.Tensor, protect: int) -> torch.Tensor:
    """Head-averaged, L2-normalised keys of the mergeable tokens [B, T, d]."""
    m = k.mean(dim=1)[:, protect:]
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _finish(x: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None, protect: int,
            x_parts: list[torch.Tensor], s_parts: list[torch.Tensor], pos_local: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x_new = torch.cat([x[:, :protect] * sizes[:, :protect]] + x_parts, dim=1)
    s_new = torch.cat([sizes[:, :protect]] + s_parts, dim=1)
    x_new = weighted_average(x_new, s_new).to(x.dtype)
    if src_map is not None and pos_local is not None:
        head = torch.arange(protect, device=x.device).unsqueeze(0).expand(x.shape[0], protect)
        new_pos = torch.cat([head, pos_local + protect], dim=1)
        src_map = new_pos.gather(1, src_map)
    return x_new, s_new, src_map


def tome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
               r: int, protect: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ToMe bipartite soft matching: A = even, B = odd mergeable tokens; the r A-tokens with the
    most similar B partner merge into it."""
    bsz, t = x.shape[0], x.shape[1] - protect
    metric = _metric(k, protect)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)            # [B, Na, Nb]
    s_a = sizes[:, protect::2, 0]
    scores = scores + (s_a <= 0).to(scores.dtype).unsqueeze(-1) * _PAD_PRIORITY
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)

    xs = x[:, protect:] * sizes[:, protect:]
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = sizes[:, protect::2], sizes[:, protect + 1::2]
    x_dst = xb.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, xb.shape[-1]), _gather_rows(xa, src_idx))
    s_dst = sb.scatter_add(1, dst_idx.unsqueeze(-1), sa.gather(1, src_idx.unsqueeze(-1)))
    pos_local = None
    if src_map is not None:
        na, nb = xa.shape[1], xb.shape[1]
        n_unm = na - r
        pos_a = torch.zeros(bsz, na, dtype=torch.long, device=x.device)
        pos_a = pos_a.scatter(1, unm_idx, torch.arange(n_unm, device=x.device).unsqueeze(0).expand(bsz, n_unm))
        pos_a = pos_a.scatter(1, src_idx, dst_idx + n_unm)
        pos_b = (torch.arange(nb, device=x.device) + n_unm).unsqueeze(0).expand(bsz, nb)
        if na > nb:
            pos_b = torch.cat([pos_b, pos_b[:, :1]], dim=1)
        pos_local = torch.stack([pos_a, pos_b], dim=-1).reshape(bsz, -1)[:, :t]
    return _finish(x, sizes, src_map, protect, [_gather_rows(xa, unm_idx), x_dst],
                   [sa.gather(1, unm_idx.unsqueeze(-1)), s_dst], pos_local)


def pitome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                 r: int, protect: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PiToMe: energy E_i = mean_j ELU(cos_ij - margin) (alpha 1, as the reference code); the 2r
    highest-energy tokens are mergeable, split alternately by rank into A and B; every A token
    merges into its most similar B token. Low-energy (isolated, informative) tokens are kept."""
    bsz, t = x.shape[0], x.shape[1] - protect
    metric = _metric(k, protect)
    sim = metric @ metric.transpose(-1, -2)                                # [B, T, T]
    energy = F.elu(sim - margin).mean(dim=-1)
    energy = energy + (sizes[:, protect:, 0] <= 0).to(energy.dtype) * _PAD_PRIORITY
    order = energy.argsort(dim=-1, descending=True)
    a_idx, b_idx, keep_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    sim_ab = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, t)).gather(2, b_idx.unsqueeze(1).expand(-1, r, -1))
    dst_idx = sim_ab.argmax(dim=-1)                                        # [B, r] into b_idx

    xs = x[:, protect:] * sizes[:, protect:]
    s = sizes[:, protect:]
    x_b = _gather_rows(xs, b_idx).scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, xs.shape[-1]),
                                              _gather_rows(xs, a_idx))
    s_b = s.gather(1, b_idx.unsqueeze(-1)).scatter_add(1, dst_idx.unsqueeze(-1), s.gather(1, a_idx.unsqueeze(-1)))
    pos_local = None
    if src_map is not None:
        n_keep = t - 2 * r
        ar = lambda n: torch.arange(n, device=x.device).unsqueeze(0).expand(bsz, n)  # noqa: E731
        pos = torch.zeros(bsz, t, dtype=torch.long, device=x.device)
        pos = pos.scatter(1, keep_idx, ar(n_keep))
        pos = pos.scatter(1, b_idx, ar(r) + n_keep)
        pos_local = pos.scatter(1, a_idx, dst_idx + n_keep)
    return _finish(x, sizes, src_map, protect, [_gather_rows(xs, keep_idx), x_b],
                   [s.gather(1, keep_idx.unsqueeze(-1)), s_b], pos_local)


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's per-layer margin m_l = 0.9 - 0.8 * l / L (vision apply_patch)."""
    return 0.9 - 0.8 * layer / max(num_layers, 1)
