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


_PAD_PRIORITY = 1e4  # pads (size 0) merge first: merging them changes nothing real


def _metric(k: torch.Tensor, protect: int) -> torch.Tensor:
    """Head-averaged, L2-normalised keys of the mergeable tokens [B, T, d].

    ``k`` is usually the [B, H, N, d] transposed view of a [B, N, H, d] projection, so the mean
    is taken over dim 2 of the un-transposed layout, which reads memory in order.
    """
    m = k.transpose(1, 2).mean(dim=2)[:, protect:]
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device).unsqueeze(0).expand(like.shape[0], n)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b, i]] for [B, N, C] x: one flat index_select (a fast row copy on CPU)."""
    bsz, n, c = x.shape
    offsets = (torch.arange(bsz, device=x.device) * n).unsqueeze(1)
    return x.reshape(bsz * n, c).index_select(0, (idx + offsets).reshape(-1)).view(bsz, idx.shape[1], c)


def merge_into_representatives(x: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                               rep: torch.Tensor, src: torch.Tensor, row: torch.Tensor, protect: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge ``src`` tokens into output rows, each row seeded by a representative token.

    ``rep`` [B, M] (mergeable-token indices) seeds output rows protect..protect+M-1; ``src`` [B, r]
    are the tokens merged away and ``row`` [B, r] their rows (0-based among the M). Each row's
    value is the size-weighted mean of its members: x_rep + Σ s_i (x_i - x_rep) / S. Only one
    full-size copy is made (the row gather); the r merges touch r rows. This keeps the merge far
    cheaper than the transformer layer it saves, which a gather/scatter/divide chain is not.
    """
    bsz, n, c = x.shape
    head = _arange(protect, rep)
    rep_all = torch.cat([head, rep + protect], dim=1)                                  # [B, n_out]
    src, row = src + protect, row + protect
    x_new = _rows(x, rep_all)
    s_new = sizes.gather(1, rep_all.unsqueeze(-1))
    s_src = sizes.gather(1, src.unsqueeze(-1))
    s_tot = s_new.scatter_add(1, row.unsqueeze(-1), s_src)
    weight = s_src / s_tot.gather(1, row.unsqueeze(-1)).clamp_min(torch.finfo(s_tot.dtype).tiny)
    delta = weight.to(x.dtype) * (_rows(x, src) - _rows(x_new, row))                     # [B, r, C]
    # Add each delta to its row with a one-hot [B, n_out, r] batched matmul: CPU scatter/index_add
    # with repeated rows is serial and, on a shared machine, orders of magnitude slower.
    onehot = torch.zeros(bsz, rep_all.shape[1], src.shape[1], dtype=x.dtype, device=x.device)
    x_new = torch.baddbmm(x_new, onehot.scatter(1, row.unsqueeze(1), 1.0), delta)
    if src_map is not None:
        dest = torch.zeros(bsz, n, dtype=torch.long, device=x.device)
        dest = dest.scatter(1, rep_all, _arange(rep_all.shape[1], rep_all)).scatter(1, src, row)
        src_map = dest.gather(1, src_map)
    return x_new, s_tot, src_map


def tome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
               r: int, protect: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ToMe bipartite soft matching: A = even, B = odd mergeable tokens; the r A-tokens with the
    most similar B partner merge into it. Output order: [protected, unmerged A, B]."""
    metric = _metric(k, protect)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)            # [B, Na, Nb]
    s_a = sizes[:, protect::2, 0]
    scores = scores + (s_a <= 0).to(scores.dtype).unsqueeze(-1) * _PAD_PRIORITY
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:].sort(dim=-1).values, edge_idx[:, :r]  # unmerged A keep their order
    dst_idx = node_idx.gather(1, src_idx)
    n_unm, nb = scores.shape[1] - r, scores.shape[2]
    rep = torch.cat([2 * unm_idx, 2 * _arange(nb, unm_idx) + 1], dim=1)   # A/B index -> token index
    return merge_into_representatives(x, sizes, src_map, rep, 2 * src_idx, dst_idx + n_unm, protect)


def pitome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                 r: int, protect: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PiToMe: energy E_i = mean_j ELU(cos_ij - margin) (alpha 1, as the reference code); the 2r
    highest-energy tokens are mergeable, split alternately by rank into A and B; every A token
    merges into its most similar B token. Low-energy (isolated, informative) tokens are kept.
    Output order: [protected, kept (energy order), B]."""
    t = x.shape[1] - protect
    metric = _metric(k, protect)
    sim = metric @ metric.transpose(-1, -2)                                # [B, T, T]
    energy = F.elu(sim - margin).mean(dim=-1)
    energy = energy + (sizes[:, protect:, 0] <= 0).to(energy.dtype) * _PAD_PRIORITY
    order = energy.argsort(dim=-1, descending=True)
    a_idx, b_idx, keep_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    sim_ab = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, t)).gather(2, b_idx.unsqueeze(1).expand(-1, r, -1))
    dst_idx = sim_ab.argmax(dim=-1)                                        # [B, r] into b_idx
    n_keep = t - 2 * r
    return merge_into_representatives(x, sizes, src_map, torch.cat([keep_idx, b_idx], dim=1), a_idx,
                                      dst_idx + n_keep, protect)


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's per-layer margin m_l = 0.9 - 0.8 * l / L (vision apply_patch)."""
    return 0.9 - 0.8 * layer / max(num_layers, 1)
