"""Token merging math: ToMe's bipartite soft matching and PiToMe's energy-protected matching.

Pure, model-agnostic tensor functions (the analogue of ToMe's ``merge.py``). Each takes the
residual stream ``x`` [B, N, C], the similarity features ``k`` (the block's keys [B, H, N, d] or
the hidden states [B, N, C]), the token state (sizes, source map), the static number of merges
``r`` and the count of leading special tokens ``protect`` that never merge, and returns the
merged state with N - r tokens. Everything is size-weighted: x' = Σ(s·x)/Σs, s' = Σs.

Papers: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), reference
``facebookresearch/ToMe``; Tran et al., "Accelerating Transformers with Spectrum-Preserving
Token Merging" (NeurIPS 2024), reference ``hchautran/PiToMe``.

Departures from ToMe: padding (size 0) merges first and never receives a real token, so a
padded sentence is exact until its pads are gone; the protected tokens are set aside before the even/odd split (as PiToMe
does) instead of masking CLS's row, so any number of leading special tokens is supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


_FIRST = 1e4  # source priority of a pad (size 0): merging it changes nothing real


def _metric(k: torch.Tensor, protect: int) -> torch.Tensor:
    """L2-normalised similarity features of the mergeable tokens [B, T, d].

    ``k`` is either keys [B, H, N, d], averaged over heads (ToMe's choice), or hidden states
    [B, N, C] used as they are. Keys are usually the [B, H, N, d] transposed view of a
    [B, N, H, d] projection, so the mean is taken over dim 2 of the un-transposed layout, which
    reads memory in order.
    """
    m = (k.transpose(1, 2).mean(dim=2) if k.dim() == 4 else k)[:, protect:]
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device).unsqueeze(0).expand(like.shape[0], n)


def _order_desc(values: torch.Tensor) -> torch.Tensor:
    """[B, T] indices that sort ``values`` descending, ties in index order (a stable sort).

    torch's argsort is not stable and ONNX's TopK breaks ties by index, so pads (which all share
    one priority) came out in different orders in eager and in ONNX Runtime; that order decides
    which pads merge, hence where the real tokens sit for the next layer's A/B split. Each
    entry's rank (greater values, then equal values earlier) is unique, so the order is the same
    in every backend: O(T^2) comparisons, small next to attention's T^2 * d.
    """
    t = values.shape[-1]
    vi, vj = values.unsqueeze(-1), values.unsqueeze(-2)
    idx = torch.arange(t, device=values.device)
    earlier = idx.unsqueeze(0) < idx.unsqueeze(1)                           # [i, j]: j before i
    rank = ((vj > vi) | ((vj == vi) & earlier)).to(torch.long).sum(dim=-1)  # [B, T], a permutation
    return torch.zeros_like(rank).scatter(1, rank, _arange(t, rank))


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


def _merge_arrangement(x: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None, tokens: torch.Tensor,
                       priority: torch.Tensor, dest: torch.Tensor, pad: torch.Tensor, r: int, protect: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge the ``r`` highest-priority positions of an arrangement of the mergeable tokens.

    ``tokens`` [B, T] is the token index at each position; kept tokens come out in this order.
    ``priority`` [B, T] ranks positions as sources (pads highest); ``dest`` [B, T] is the position
    each would merge into, which must never itself be a source. ``pad`` [B, T] marks padding:
    a pad merges into output row 0, which changes nothing because its size is 0.
    """
    t = tokens.shape[1]
    src = _order_desc(priority)[:, :r]
    is_src = torch.zeros_like(tokens).scatter(1, src, 1)
    kept = (_arange(t, tokens) + is_src * t).argsort(dim=-1)[:, :t - r]          # in arrangement order
    row_of = torch.zeros_like(tokens).scatter(1, kept, _arange(t - r, kept))
    row = torch.where(pad.gather(1, src), 0, row_of.gather(1, dest.gather(1, src)))
    return merge_into_representatives(x, sizes, src_map, tokens.gather(1, kept), tokens.gather(1, src), row, protect)


def tome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
               r: int, protect: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ToMe bipartite soft matching: A = even, B = odd mergeable tokens; the r A-tokens with the
    most similar B partner merge into it. Output order: [protected, unmerged A, B].

    Padding (size 0) goes first from either side, so a padded sentence loses real tokens only
    once its pads are gone; real tokens never merge into a pad. Without pads this is ToMe exactly.
    """
    metric = _metric(k, protect)
    pad = sizes[:, protect:, 0] <= 0                                        # [B, T]
    if metric.is_cuda and not torch.compiler.is_exporting():   # ONNX/TensorRT exports keep plain torch ops
        from tcompile.kernels import token_merge  # noqa: F401  (registers tcompile::tome_match, Triton on CUDA)
        node_max, node_idx = torch.ops.tcompile.tome_match(metric[:, ::2], metric[:, 1::2],
                                                           pad[:, 1::2].contiguous(), -_FIRST)
    else:
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)        # [B, Na, Nb]
        scores = scores.masked_fill(pad[:, 1::2].unsqueeze(1), -_FIRST)
        node_max, node_idx = scores.max(dim=-1)
    na, nb = node_max.shape[1], metric.shape[1] - node_max.shape[1]
    tokens = torch.cat([2 * _arange(na, node_idx), 2 * _arange(nb, node_idx) + 1], dim=1)
    priority = torch.cat([node_max, node_max.new_full((node_max.shape[0], nb), -2 * _FIRST)], dim=1)
    pad = torch.cat([pad[:, ::2], pad[:, 1::2]], dim=1)
    dest = torch.cat([node_idx + na, torch.zeros_like(node_idx[:, :1]).expand(-1, nb)], dim=1)
    return _merge_arrangement(x, sizes, src_map, tokens, priority.masked_fill(pad, _FIRST), dest, pad, r, protect)


def pitome_merge(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                 r: int, protect: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PiToMe: energy E_i = mean_j ELU(cos_ij - margin) (alpha 1, as the reference code); the 2r
    highest-energy tokens are mergeable, split alternately by rank into A and B; every A token
    merges into its most similar B token. Low-energy (isolated, informative) tokens are kept.
    Output order: [protected, kept (energy order), B].

    Padding (size 0) is left out of the energy, goes first as a source, and is never a
    destination; then the highest-energy A tokens merge. Without pads this is PiToMe exactly.
    """
    t = x.shape[1] - protect
    metric = _metric(k, protect)
    pad = sizes[:, protect:, 0] <= 0
    real = (~pad).to(metric.dtype)
    sim = metric @ metric.transpose(-1, -2)                                # [B, T, T]
    energy = (F.elu(sim - margin) * real.unsqueeze(1)).sum(dim=-1) / real.sum(dim=-1, keepdim=True).clamp_min(1.0)
    order = _order_desc(energy.masked_fill(pad, -_FIRST))
    a_idx, b_idx, keep_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    sim_ab = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, t)).gather(2, b_idx.unsqueeze(1).expand(-1, r, -1))
    dst_idx = sim_ab.masked_fill(pad.gather(1, b_idx).unsqueeze(1), -_FIRST).argmax(dim=-1)   # [B, r] into b_idx
    tokens = torch.cat([a_idx, keep_idx, b_idx], dim=1)                    # positions: A | kept | B
    rank = -torch.arange(r, device=x.device, dtype=energy.dtype)           # A by energy rank
    priority = torch.cat([rank.expand(x.shape[0], r), energy.new_full((x.shape[0], t - r), -2 * _FIRST)], dim=1)
    pad = pad.gather(1, tokens)
    dest = torch.cat([dst_idx + (t - r), torch.zeros_like(dst_idx[:, :1]).expand(-1, t - r)], dim=1)
    return _merge_arrangement(x, sizes, src_map, tokens, priority.masked_fill(pad, _FIRST), dest, pad, r, protect)


def pitome_margin(layer: int, num_layers: int) -> float:
    """PiToMe's per-layer margin m_l = 0.9 - 0.8 * l / L (vision apply_patch)."""
    return 0.9 - 0.8 * layer / max(num_layers, 1)
