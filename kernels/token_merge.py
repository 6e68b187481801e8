"""ToMe bipartite matching on CUDA: the custom op ``tcompile::tome_match``.

Token merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) splits the
mergeable tokens into A (even) and B (odd) positions and merges each of the r A tokens with the
most similar B partner into it. The expensive part is the O(Na*Nb*C) cosine similarity followed
by a row max/argmax; PyTorch materialises the [B, Na, Nb] score matrix for it. The Triton kernel
here streams B in tiles and keeps only the running max and argmax per A token (the
FlashAttention trick applied to argmax), so the score matrix never reaches memory. The cheap
rest, top-r selection and the size-weighted reduction (topk/gather/scatter_add), stays in
PyTorch exactly as ``tcompile.passes.merge_ops`` does it, so the graph still exports.

``tome_match`` replaces these three lines of ``merge_ops.tome_merge``::

    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores = scores.masked_fill(pad[:, 1::2].unsqueeze(1), -_FIRST)
    node_max, node_idx = scores.max(dim=-1)

On CPU (no interpreter) the op runs exactly those lines, so results are bit-identical there.
On CUDA the scores are fp32 dots of the (already L2-normalised) metric, so near-ties between
two B partners may resolve differently from an fp16 matmul; ties inside the kernel keep the
lowest index, as ``torch.max`` does.
"""
from __future__ import annotations

import torch

from tcompile.kernels.block_sparse_attention import tl, triton, triton_usable

__all__ = ["tome_match", "tome_match_reference", "tome_merge_triton"]


def tome_match_reference(a_metric: torch.Tensor, b_metric: torch.Tensor, b_pad: torch.Tensor,
                         pad_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best B score and index; padded B tokens score ``pad_score`` (merge_ops' math)."""
    scores = a_metric @ b_metric.transpose(-1, -2)                                       # [B, Na, Nb]
    scores = scores.masked_fill(b_pad.unsqueeze(1), pad_score)
    best, idx = scores.max(dim=-1)
    return best.float(), idx


if triton is not None:

    @triton.jit
    def _tome_match_fwd(A, Bm, PAD, SCORE, INDEX, NA, NB, C, pad_score,
                        sab, san, sac, sbb, sbn, sbc, spb, spn,
                        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                        DOT_FP32: tl.constexpr):
        pa = tl.program_id(0)
        bb = tl.program_id(1).to(tl.int64)
        ra = pa * BLOCK_A + tl.arange(0, BLOCK_A)
        amask = ra < NA
        best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
        best_i = tl.zeros([BLOCK_A], dtype=tl.int32)
        for n0 in range(0, NB, BLOCK_B):
            rb = n0 + tl.arange(0, BLOCK_B)
            bmask = rb < NB
            s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                cm = oc < C
                a = tl.load(A + bb * sab + ra[:, None] * san + oc[None, :] * sac, mask=amask[:, None] & cm[None, :],
                            other=0.0)
                b_t = tl.load(Bm + bb * sbb + rb[None, :] * sbn + oc[:, None] * sbc,
                              mask=bmask[None, :] & cm[:, None], other=0.0)
                if DOT_FP32:
                    s += tl.dot(a.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
                else:
                    s += tl.dot(a, b_t)
            pad = tl.load(PAD + bb * spb + rb * spn, mask=bmask, other=0)
            s = tl.where(pad[None, :] != 0, pad_score, s)
            s = tl.where(bmask[None, :], s, float("-inf"))
            tile_max = tl.max(s, 1)
            tile_arg = tl.argmax(s, 1, tie_break_left=True)
            better = tile_max > best  # strict: an earlier tile wins a tie, as torch.max's first index
            best_i = tl.where(better, tile_arg + n0, best_i)
            best = tl.where(better, tile_max, best)
        tl.store(SCORE + bb * NA + ra, best, mask=amask)
        tl.store(INDEX + bb * NA + ra, best_i.to(tl.int64), mask=amask)
else:  # pragma: no cover
    _tome_match_fwd = None


@torch.library.triton_op("tcompile::tome_match", mutates_args=())
def tome_match(a_metric: torch.Tensor, b_metric: torch.Tensor, b_pad: torch.Tensor,
               pad_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each A token, the max similarity over B tokens and its argmax.

    a_metric [B,Na,C], b_metric [B,Nb,C] (L2-normalised, so a dot is a cosine); b_pad [B,Nb]
    bool marks padded B tokens, which score ``pad_score`` (merge_ops uses -1e4: a real token
    prefers any real partner, never a pad). Returns (best_score fp32 [B,Na], best_index int64
    [B,Na]).
    """
    if a_metric.dim() != 3 or b_metric.dim() != 3:
        raise ValueError(f"tome_match: metrics must be [B, N, C], got {tuple(a_metric.shape)} and "
                         f"{tuple(b_metric.shape)}")
    bsz, na, c = a_metric.shape
    nb = b_metric.shape[1]
    if b_metric.shape[0] != bsz or b_metric.shape[2] != c:
        raise ValueError(f"tome_match: a_metric {tuple(a_metric.shape)} and b_metric {tuple(b_metric.shape)} must "
                         "share batch and feature sizes")
    if nb == 0:
        raise ValueError("tome_match: B side is empty (need at least one B token to match)")
    if tuple(b_pad.shape) != (bsz, nb) or b_pad.dtype != torch.bool:
        raise ValueError(f"tome_match: b_pad must be bool [{bsz}, {nb}], got {b_pad.dtype} {tuple(b_pad.shape)}")
    if b_metric.dtype != a_metric.dtype:
        raise ValueError(f"tome_match: a_metric ({a_metric.dtype}) and b_metric ({b_metric.dtype}) dtypes differ")
    if not triton_usable(a_metric, _tome_match_fwd) or not a_metric.dtype.is_floating_point:
        return tome_match_reference(a_metric, b_metric, b_pad, pad_score)
    score = torch.empty((bsz, na), dtype=torch.float32, device=a_metric.device)
    index = torch.empty((bsz, na), dtype=torch.int64, device=a_metric.device)
    if na == 0 or bsz == 0:
        return score, index
    pad = b_pad.to(torch.int8)
    block_c = min(64, max(16, 1 << (c - 1).bit_length()))
    torch.library.wrap_triton(_tome_match_fwd)[(-(-na // 64), bsz)](
        a_metric, b_metric, pad, score, index, na, nb, c, pad_score,
        *a_metric.stride(), *b_metric.stride(), *pad.stride(),
        BLOCK_A=64, BLOCK_B=64, BLOCK_C=block_c,
        DOT_FP32=bool(a_metric.device.type == "cpu" or a_metric.dtype == torch.float32), num_warps=4)
    return score, index


def tome_merge_triton(x: torch.Tensor, k: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None,
                      r: int, protect: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``merge_ops.tome_merge`` with its similarity/matching step done by ``tcompile::tome_match``.

    Same signature, same output order [protected, unmerged A, B], same padding rules.
    """
    from tcompile.passes import merge_ops as mo  # late: kernels must not import passes at load time

    metric = mo._metric(k, protect)
    pad = sizes[:, protect:, 0] <= 0                                                      # [B, T]
    node_max, node_idx = torch.ops.tcompile.tome_match(metric[:, ::2], metric[:, 1::2], pad[:, 1::2].contiguous(),
                                                       -mo._FIRST)
    na, nb = node_max.shape[1], metric.shape[1] - node_max.shape[1]
    tokens = torch.cat([2 * mo._arange(na, node_idx), 2 * mo._arange(nb, node_idx) + 1], dim=1)
    priority = torch.cat([node_max, node_max.new_full((node_max.shape[0], nb), -2 * mo._FIRST)], dim=1)
    pad = torch.cat([pad[:, ::2], pad[:, 1::2]], dim=1)
    dest = torch.cat([node_idx + na, torch.zeros_like(node_idx[:, :1]).expand(-1, nb)], dim=1)
    return mo._merge_arrangement(x, sizes, src_map, tokens, priority.masked_fill(pad, mo._FIRST), dest, pad, r,
                                 protect)
