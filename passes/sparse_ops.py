"""Sparse prefill attention math: MInference's patterns, estimated per head, and a CPU path.

MInference 1.0 (Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs
via Dynamic Sparse Attention", NeurIPS 2024) observes that in a long prompt each head's attention
keeps one of a few shapes, and that the shape's exact positions can be estimated cheaply from the
prompt itself, so prefill need only compute the few key/query pairs that carry the mass:

* ``a_shape``: sink tokens plus a local window (static; StreamingLLM's shape);
* ``vertical_slash``: a few key columns (verticals) plus a few diagonals (slashes), picked from
  the attention of the last ``last_q`` queries (MInference's online estimate);
* ``block_topk``: per query block, the key blocks whose mean-pooled keys meet the block's
  mean-pooled query best (MInference's block-sparse estimate).

``density`` is the share of the causal (query, key ≤ query) pairs a pattern may compute: kept
blocks for the block patterns; for vertical_slash the block-wide key ranges its diagonals need
plus its columns (what the kernels and the CPU path actually touch), so density is a work budget
on every pattern. Forced lines (``sinks`` columns / blocks, the ``window`` nearest diagonals /
blocks) count against it but are always kept, so a row always sees itself. At density 1 every
pattern keeps every pair, which makes the op equal dense attention.

Where it runs: on CUDA the indices go to the Triton custom ops of ``tcompile.kernels``
(``block_sparse_attention``, ``vertical_slash_attention``). On CPU :func:`gathered_attention`
gathers, per query block, only the keys the pattern visits and runs one batched SDPA over them
with the exact pattern mask inside: work scales with the visited keys, not with N², which is
what makes sparse prefill faster than dense SDPA on a CPU. Everything here works on one
unpadded sequence: q [H, n, d], k/v [Hkv, n, d], ``kv_of`` [H] the KV head of each query head;
the op in ``sparse_attention.py`` strips left padding row by row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CODES: dict[str, str] = {"a": "a_shape", "b": "block_topk", "v": "vertical_slash", "d": "dense"}
CODE_OF: dict[str, str] = {name: code for code, name in CODES.items()}
CHUNK_ELEMENTS = 1 << 22     # scores per batched SDPA call on CPU (16 MB in fp32): stays in cache-sized pieces


# ----------------------------------------------------------------------------- helpers
def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def compact(need: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean [..., n] as ascending index lists [..., L] (L = the longest list; ``fill`` after
    each list's end) and their lengths [...]."""
    count = need.sum(-1)
    width = int(count.max()) if count.numel() else 0
    order = (~need).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]        # kept positions first
    return torch.where(torch.arange(width, device=need.device) < count[..., None], order, fill), count


def lut(index: torch.Tensor, n: int) -> torch.Tensor:
    """[H, n] bool: True at every entry of ``index`` [H, k] that lies in [0, n) (-1 pads)."""
    idx = torch.where((index >= 0) & (index < n), index, n)
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    return out.scatter(1, idx, True)[:, :n]


def grouped_scores(q: torch.Tensor, k: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
    """q [H, l, d] · k[kv_of]ᵀ → [H, l, n]; with the usual GQA map one matmul per KV head, no K copy."""
    h, rows, d = q.shape
    hk = k.shape[0]
    if h % hk == 0 and torch.equal(kv_of, torch.arange(h, device=q.device) // (h // hk)):
        return (q.reshape(hk, (h // hk) * rows, d) @ k.transpose(1, 2)).view(h, rows, -1)
    return q @ k.index_select(0, kv_of).transpose(1, 2)


def blocks_of(tokens: int, block: int) -> int:
    return -(-tokens // block)


def local_blocks(window: int, block: int) -> int:
    """Key blocks ending at the diagonal that give every row of a query block its ``window``
    nearest tokens (itself included)."""
    return 1 + blocks_of(max(window - 1, 0), block)


# ----------------------------------------------------------------------------- estimation
def vertical_slash_indices(q: torch.Tensor, k: torch.Tensor, kv_of: torch.Tensor, density: float, block: int,
                           sinks: int, window: int, last_q: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's online vertical-slash estimate: (vertical [H, V], slash [H, S]), -1 padded.

    The last ``last_q`` queries attend to every key (fp32 softmax, causal inside the last
    block); a column's score is the mass it gets, a diagonal's (offset o = i - j) the mass
    along it. Columns below ``sinks`` and offsets below ``window`` (at least offset 0, so every
    row sees itself) are forced, as MInference forces 30 columns and 100 offsets. The rest are
    taken in order of mass, columns and diagonals in one ranking (both scores are mass over the
    same rows), as many as the budget allows: the pairs computed (:func:`vs_cost`: a diagonal
    costs a ``block``-wide key range per query block unless a neighbour covers it, as in
    MInference's kernels) stay within ``density`` of the causal pairs. Density 1 keeps every column.
    """
    h, n, _ = q.shape
    dev = q.device
    if density >= 1.0:
        return torch.arange(n, device=dev).expand(h, n).contiguous(), torch.zeros(h, 1, dtype=torch.long, device=dev)
    rows = min(last_q, n)
    logits = grouped_scores(q[:, n - rows:].float() * scale, k.float(), kv_of)          # [H, l, n]
    i = torch.arange(n - rows, n, device=dev)[:, None]
    j = torch.arange(n, device=dev)[None, :]
    probs = logits.masked_fill(j > i, float("-inf")).softmax(dim=-1)
    vert = probs.sum(dim=1)                                                              # [H, n]
    offsets = (i - j).clamp(min=0).reshape(1, -1).expand(h, -1)    # masked pairs carry 0 mass
    slash = torch.zeros(h, n, device=dev).scatter_add_(1, offsets, probs.reshape(h, -1))
    vert[:, :sinks] = float("inf")
    slash[:, :max(1, window)] = float("inf")
    score = torch.cat([vert, slash], dim=1)
    rank = torch.empty(h, 2 * n, dtype=torch.long, device=dev).scatter_(
        1, score.argsort(dim=1, descending=True, stable=True), torch.arange(2 * n, device=dev).expand(h, -1))
    lo = score.isinf().sum(1)                                 # forced lines: kept even over budget
    hi = torch.full_like(lo, 2 * n)
    budget = density * causal_pairs(n)
    while bool((lo < hi).any()):                              # largest top-t within budget, per head
        mid = (lo + hi + 1) // 2
        keep = rank < mid[:, None]
        fits = vs_cost(keep[:, :n], keep[:, n:], block) <= budget
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid - 1)
    keep = rank < lo[:, None]
    vertical, _ = compact(keep[:, :n], fill=-1)
    slashes, _ = compact(keep[:, n:], fill=-1)
    return vertical, slashes


def _dilate(slut: torch.Tensor, block: int) -> torch.Tensor:
    """[H, n + block - 1] bool over p = -(block-1) .. n-1: p is covered iff a kept offset lies in
    [p, p + block - 1]. Query block m (first row lo) reads key lo - p for each covered p ≤ lo."""
    prefix = F.pad(slut.to(torch.int32).cumsum(1, dtype=torch.int32), (block, block - 1), value=0)
    prefix[:, prefix.shape[1] - (block - 1):] = prefix[:, -block:1 - block]     # beyond n: no more offsets
    return prefix[:, block:] > prefix[:, :-block]


def vs_cost(vlut: torch.Tensor, slut: torch.Tensor, block: int) -> torch.Tensor:
    """Pairs [H] the CPU path computes for these columns and offsets (an upper bound: columns a
    diagonal range already covers are counted again)."""
    n = vlut.shape[1]
    mq = blocks_of(n, block)
    p = torch.arange(-(block - 1), n, device=vlut.device)
    slash_blocks = mq - torch.div(p.clamp(min=0) + block - 1, block, rounding_mode="floor")   # blocks with lo >= p
    col_blocks = mq - torch.arange(n, device=vlut.device) // block                        # blocks with hi >= j
    return block * ((_dilate(slut, block) * slash_blocks).sum(1) + (vlut * col_blocks).sum(1))


def _forced_blocks(mq: int, sinks: int, window: int, block: int, device: torch.device) -> torch.Tensor:
    """[M, M] bool: the sink blocks and the local blocks (the diagonal always) of each query block."""
    m = torch.arange(mq, device=device)[:, None]
    kb = torch.arange(mq, device=device)[None, :]
    local = local_blocks(window, block)
    return (kb <= m) & ((kb < blocks_of(sinks, block)) | (m - kb < local))


def block_topk_indices(q: torch.Tensor, k: torch.Tensor, kv_of: torch.Tensor, density: float, sinks: int,
                       window: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's block-sparse estimate: (block_index [H, M, T], block_count [H, M]).

    Queries and keys are mean-pooled per ``block`` tokens; a key block's score for a query block
    is the dot product of the means (no scale, as MInference). Query block m keeps its
    ceil(density × (m + 1)) best causal key blocks, forced sink and local blocks included (the
    diagonal block always, so every row sees itself). Lists are ascending; -1 after ``count``.
    """
    h, n, d = q.shape
    mq = blocks_of(n, block)
    pad = mq * block - n
    size = torch.full((mq,), float(block), device=q.device)
    size[-1] = block - pad
    qp = F.pad(q.float(), (0, 0, 0, pad)).view(h, mq, block, d).sum(2) / size[:, None]
    kp = F.pad(k.float(), (0, 0, 0, pad)).view(k.shape[0], mq, block, d).sum(2) / size[:, None]
    scores = qp @ kp.index_select(0, kv_of).transpose(1, 2)                                # [H, M, M]
    forced = _forced_blocks(mq, sinks, window, block, q.device)
    causal = torch.ones(mq, mq, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    m = torch.arange(mq, device=q.device)
    want = torch.maximum(torch.ceil(density * (m + 1) - 1e-9).long(), forced.sum(1)).clamp(max=m + 1)  # [M]
    top = scores.topk(int(want.max()), dim=-1).indices                                    # [H, M, T]
    need = torch.zeros(h, mq, mq, dtype=torch.bool, device=q.device)
    need.scatter_(-1, top, (torch.arange(top.shape[-1], device=q.device) < want[:, None]).expand_as(top))
    return compact(need, fill=-1)


def a_shape_indices(n: int, heads: int, density: float, sinks: int, window: int, block: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A-shape (StreamingLLM's sinks + local window, MInference's static pattern) as block lists.

    The window is the smallest whose blocks reach ``density`` of the causal blocks, and at least
    ``window`` tokens for every row: static for a prompt length, the same for every head.
    """
    mq = blocks_of(n, block)
    m = torch.arange(mq, device=device)[:, None]
    kb = torch.arange(mq, device=device)[None, :]
    sink = kb < blocks_of(sinks, block)
    target = density * causal_pairs(mq)
    for local in range(min(local_blocks(window, block), mq), mq + 1):
        need = (kb <= m) & (sink | (m - kb < local))
        if need.sum() >= target - 1e-9:
            break
    idx, count = compact(need, fill=-1)
    return idx.expand(heads, -1, -1).contiguous(), count.expand(heads, -1).contiguous()


# ----------------------------------------------------------------------------- visit lists
@dataclass
class Visits:
    """Keys each query block reads: ``keys`` [H, M, W], the first ``count`` [H, M] valid (keys past
    the last row are masked causally). Without ``row_bias`` every valid key at or before a row is
    attended. With it (exact vertical-slash diagonals), valid key t reaches row r of a block iff
    ``row_bias[h, r, t] == 0`` (on a kept diagonal, causal: one additive table shared by every
    block, so the mask stays a broadcast) and ``keep[h, m, t]``."""

    keys: torch.Tensor
    count: torch.Tensor
    row_bias: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def block_visits(index: torch.Tensor, count: torch.Tensor, block: int) -> list[Visits]:
    """The keys of each query block's listed key blocks (ascending)."""
    keys = (index.clamp(min=0)[..., None] * block + torch.arange(block, device=index.device)).flatten(-2)
    return [Visits(keys, count * block)]


def slash_visits(vertical: torch.Tensor, slash: torch.Tensor, n: int, block: int, tiles: bool = False
                 ) -> list[Visits]:
    """The keys the rows of each query block read on a kept diagonal or column, each once.

    ``tiles``: every causal key of the diagonals' key ranges reaches every row of the block, as
    in MInference's kernel (the scores are computed anyway); else only the exact pattern.

    Diagonals: block m (first row lo) reads keys lo - p for every p :func:`_dilate` covers with
    p <= lo (a union of ``block``-wide ranges, the same list for every block, shifted, so the
    row/offset test ``slash[r + p]`` is one [H, block, P] table shared by all blocks). Columns:
    the kept columns at or before the block's last row (with ``tiles``, those no range covers).
    Every key is read once per block. O(H·M·(P + V)) work, no [N, N] tensor.
    """
    dev = vertical.device
    vlut, slut = lut(vertical, n), lut(slash, n)
    mq = blocks_of(n, block)
    lo = torch.arange(mq, device=dev) * block
    hi = torch.clamp(lo + block, max=n) - 1
    covered = _dilate(slut, block)                                                     # [H, n + block - 1]
    p, p_count = compact(covered, fill=n + block - 1)                                  # index u = p + block - 1
    p = p - (block - 1)                                                                # ascending; fill > n
    h, width = p.shape
    s_keys = lo[None, :, None] - p[:, None, :]                                         # [H, M, P]
    s_count = ((p[:, None, :] <= lo[None, :, None]) & (torch.arange(width, device=dev) < p_count[:, None, None])
               ).sum(-1)
    cols = vertical.clamp(min=0)
    c_ok = (vertical[:, None, :] >= 0) & (cols[:, None, :] <= hi[None, :, None])          # [H, M, V]
    if tiles:       # a column inside a range is read there: only the others go to the column part
        c_p = lo[None, :, None] - cols[:, None, :] + (block - 1)                       # index into covered
        c_ok &= ~((c_p <= n + block - 2) & covered.gather(1, c_p.clamp(0, n + block - 2).reshape(h, -1)
                                                          ).view(c_p.shape))
    order = (~c_ok).to(torch.int8).argsort(dim=-1, stable=True)                        # valid columns first
    columns = Visits(cols[:, None, :].expand(-1, mq, -1).gather(-1, order), c_ok.sum(-1))
    if tiles:
        return [Visits(s_keys, s_count), columns]
    # Exact: a range key reaches a row only on a kept diagonal; kept columns are all read in the
    # column part, so a column inside a range is excluded from the range (one [H, M, P] table).
    r_off = torch.arange(block, device=dev)[None, :, None] + p[:, None, :]             # [H, block, P]: row - key
    row_hit = slut.gather(1, r_off.clamp(0, n - 1).reshape(h, -1)).view(r_off.shape) & (r_off >= 0) & (r_off < n)
    row_bias = torch.zeros(row_hit.shape, device=dev).masked_fill(~row_hit, float("-inf"))
    is_column = vlut.gather(1, s_keys.clamp(0, n - 1).reshape(h, -1)).view(s_keys.shape)
    return [Visits(s_keys, s_count, row_bias, ~is_column), columns]


# ----------------------------------------------------------------------------- CPU compute
def _uniform(visits: list[Visits]) -> list[int] | None:
    """Per query block its key count when the visits are plain block lists whose count is the
    same for every head (then each list ends with the diagonal block and needs no per-element
    mask: see :func:`gathered_attention`); None otherwise."""
    if len(visits) != 1 or visits[0].row_bias is not None:
        return None
    count = visits[0].count
    return count[0].tolist() if bool((count == count[:1]).all()) else None


def _chunk_mask(part: Visits, kc: torch.Tensor, rows: torch.Tensor, m0: int, m1: int, block: int, uniform: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive (or boolean) mask of one part over query blocks m0..m1: as small and as
    broadcast as the part allows, since writing a per-element mask costs as much as the scores."""
    width, dev = kc.shape[-1], kc.device
    if uniform:                     # full lists ending with the diagonal block: bottom-right causal
        i = torch.arange(block, device=dev)[:, None]
        return torch.arange(width, device=dev)[None, :] <= i + (width - block)
    valid = torch.arange(width, device=dev) < part.count[:, m0:m1, None]                  # [H, c, W]
    if part.row_bias is None:
        return valid[:, :, None, :] & (kc[:, :, None, :] <= rows)
    bias = part.row_bias[:, None, :, :width].to(dtype)                                  # [H, 1, block, W]
    if part.keep is not None:
        valid = valid & part.keep[:, m0:m1, :width]
    return bias if bool(valid.all()) else bias + additive(valid[:, :, None, :], dtype)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf elsewhere."""
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                       torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_of: torch.Tensor,
                       visits: list[Visits], scale: float, block: int) -> torch.Tensor:
    """Causal attention of q [H, n, d] over only the keys each query block visits: [H, n, d].

    Query blocks are processed in chunks of consecutive blocks; each part's key lists are cut
    to the chunk's longest, the parts' gathered K/V concatenated, and the chunk is one batched
    SDPA call with the exact mask (valid, causal, pattern) inside the gathered set. Chunks stay
    near ``CHUNK_ELEMENTS`` scores so the working set stays cache-sized. Block lists of one
    length for every head (block_topk, a_shape) are ascending, so the diagonal block comes last:
    chunks of equal length then need only one [block, W] bottom-right causal mask, broadcast over
    heads and blocks, instead of a per-element one (the mask traffic is a third of the time).
    """
    h, n, d = q.shape
    mq = blocks_of(n, block)
    n_pad = mq * block
    if n_pad != n:                                                  # block lists may point past n: zeros
        q, k, v = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))
    qf, kf, vf = q.reshape(h, mq, block, d), k.reshape(-1, d), v.reshape(-1, d)
    base = (kv_of * n_pad)[:, None, None]
    out = q.new_empty(h, mq, block, d)
    longest = [part.count.amax(0).tolist() for part in visits]
    uniform = _uniform(visits)
    m0 = 0
    while m0 < mq:
        m1, widths = m0 + 1, [w[m0] for w in longest]
        while m1 < mq and (uniform is None or uniform[m1] == uniform[m0]) and \
                h * (m1 + 1 - m0) * block * sum(max(a, w[m1]) for a, w in zip(widths, longest)) <= CHUNK_ELEMENTS:
            widths = [max(a, w[m1]) for a, w in zip(widths, longest)]
            m1 += 1
        rows = torch.arange(m0 * block, m1 * block, device=q.device).view(1, m1 - m0, block, 1)
        keys, masks = [], []
        for part, width in zip(visits, widths):
            kc = part.keys[:, m0:m1, :width]
            keys.append(kc.clamp(0, n_pad - 1))
            masks.append(_chunk_mask(part, kc, rows, m0, m1, block, uniform is not None, q.dtype))
        index = (torch.cat(keys, -1) + base).reshape(-1)
        kg = kf.index_select(0, index).view(h, m1 - m0, -1, d)
        vg = vf.index_select(0, index).view(h, m1 - m0, -1, d)
        if len(masks) > 1:
            masks = [additive(x, q.dtype) if x.dtype == torch.bool else x for x in masks]
        mask = masks[0] if len(masks) == 1 else torch.cat([x.expand(h, m1 - m0, block, -1) for x in masks], -1)
        out[:, m0:m1] = F.scaled_dot_product_attention(qf[:, m0:m1], kg, vg, attn_mask=mask, scale=scale)
        m0 = m1
    return out.view(h, n_pad, d)[:, :n]


# ----------------------------------------------------------------------------- dense references
def pattern_mask(kind: str, indices: tuple[torch.Tensor, torch.Tensor], n: int, block: int,
                 rows: slice = slice(None)) -> torch.Tensor:
    """The dense boolean mask [H, rows, n] a pattern allows (causal included): for the recall of
    ``auto`` calibration and for tests."""
    i = torch.arange(n, device=indices[0].device)[rows][:, None]
    j = torch.arange(n, device=indices[0].device)[None, :]
    if kind in ("vertical_slash", "vertical_slash_tiles"):
        vlut, slut = lut(indices[0], n), lut(indices[1], n)
        if kind == "vertical_slash_tiles":     # key j is in the range of block i // block: lo - j covered
            p = (i // block * block - j + block - 1).clamp(0, n + block - 2)
            return (j <= i) & (vlut[:, None, :] | _dilate(slut, block)[:, p])
        return (j <= i) & (vlut[:, None, :] | slut[:, (i - j).clamp(min=0)])
    index, count = indices
    mq = index.shape[1]
    t = torch.arange(index.shape[-1], device=index.device)
    ok = (t < count[..., None]) & (index >= 0)
    blocks = torch.zeros(index.shape[0], mq, mq + 1, dtype=torch.bool, device=index.device)
    blocks = blocks.scatter(-1, torch.where(ok, index, mq), True)[..., :mq]
    dense = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n]
    return dense[:, rows] & (j <= i)


def recall(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each head's attention mass [H, rows, n] that ``mask`` keeps, averaged over rows: [H]."""
    return (probs * mask).sum(-1).mean(-1)


def head_scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None or scale <= 0 else float(scale)


# ----------------------------------------------------------------------------- one sequence
def estimate(code: str, q: torch.Tensor, k: torch.Tensor, kv_of: torch.Tensor, density: float, block: int,
             sinks: int, window: int, last_q: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern ``code`` ('a', 'b' or 'v') of heads q [H, n, d]: block lists or (vertical, slash)."""
    if code == "v":
        return vertical_slash_indices(q, k, kv_of, density, block, sinks, window, last_q, scale)
    if code == "b":
        return block_topk_indices(q, k, kv_of, density, sinks, window, block)
    if code == "a":
        return a_shape_indices(q.shape[1], q.shape[0], density, sinks, window, block, q.device)
    raise ValueError(f"unknown sparse pattern code {code!r}; expected one of {sorted(CODES)}")


def _attend_heads(code: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_of: torch.Tensor,
                  density: float, block: int, sinks: int, window: int, last_q: int, scale: float,
                  use_kernels: bool, tiles: bool) -> torch.Tensor:
    if code == "d":
        ks, vs = k.index_select(0, kv_of), v.index_select(0, kv_of)
        return F.scaled_dot_product_attention(q[None], ks[None], vs[None], is_causal=True, scale=scale)[0]
    indices = estimate(code, q, k, kv_of, density, block, sinks, window, last_q, scale)
    if use_kernels:   # the Triton ops take one KV head per query-head group: give each query head its own
        from tcompile.kernels import block_sparse_attention as bsa, vertical_slash as vsa   # noqa: F401  (register)
        ks, vs = k.index_select(0, kv_of)[None], v.index_select(0, kv_of)[None]
        a, b = (t.to(torch.int32)[None] for t in indices)
        if code == "v":
            return torch.ops.tcompile.vertical_slash_attention(q[None], ks, vs, a, b, block, scale, tiles)[0]
        return torch.ops.tcompile.block_sparse_attention(q[None], ks, vs, a, b, block, scale, True)[0]
    visits = slash_visits(*indices, q.shape[1], block, tiles) if code == "v" else block_visits(*indices, block)
    return gathered_attention(q, k, v, kv_of, visits, scale, block)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes: str, density: float, block: int, sinks: int,
           window: int, last_q: int, scale: float, use_kernels: bool, tiles: bool = False) -> torch.Tensor:
    """Causal sparse attention of one unpadded sequence: q [H, n, d], k/v [Hkv, n, d] → [H, n, d].

    ``codes``: one pattern code for every head, or one per query head ('a', 'b', 'v', 'd' =
    dense); heads that share a code are estimated and computed together.
    """
    h = q.shape[0]
    codes = codes * h if len(codes) == 1 else codes
    kv_all = torch.arange(h, device=q.device) // (h // k.shape[0])
    if len(set(codes)) == 1:
        return _attend_heads(codes[0], q, k, v, kv_all, density, block, sinks, window, last_q, scale, use_kernels,
                             tiles)
    out = torch.empty_like(q)
    for code in sorted(set(codes)):
        heads = torch.tensor([i for i, c in enumerate(codes) if c == code], device=q.device)
        out[heads] = _attend_heads(code, q.index_select(0, heads), k, v, kv_all[heads], density, block, sinks,
                                   window, last_q, scale, use_kernels, tiles)
    return out
