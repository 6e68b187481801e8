"""Vertical-slash sparse attention: the custom op ``tcompile::vertical_slash_attention``.

MInference's main long-prefill pattern (Jiang et al., "MInference 1.0: Accelerating Pre-filling
for Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024): per head a set of key
columns (verticals) and a set of diagonals (slashes, offset o: query i sees key i + (Nk-Nq) - o),
always causal. As in MInference's ``convert_vertical_slash_indexes`` + mixed sparse kernel, each
query block of ``block_size`` rows visits

* a block part: key ranges of ``block_size`` keys covering the slash lines that cross the block
  (one greedy left-to-right cover, so an isolated slash costs one tile, not two aligned
  blocks), computed densely with tensor-core dots, and
* a column part: the verticals that no tile covers, gathered ``block_size`` at a time,

with one FlashAttention-2 online softmax across both. Two semantics (``tiles``):

* ``tiles=False`` (exact): tiles are masked to the exact pattern (slash offset or vertical
  column), and a vertical inside a tile is counted there only, so the op equals the dense-mask
  ``vertical_slash_reference`` to rounding;
* ``tiles=True`` (MInference's kernel): every causal key inside a tile is attended (its score
  is computed anyway), plus the uncovered verticals: the same work, more of the attention mass
  kept. The reference then takes :func:`vertical_slash_tiles_mask`.

Index entries outside [0, Nk) are ignored (use -1 to pad), as are repeats.
"""
from __future__ import annotations

import torch

from tcompile.kernels.block_sparse_attention import (_LOG2E, attend_tile, check_attention_inputs, check_index,
                                                     kernel_meta, kv_heads_for, load_kv_tile,
                                                     masked_softmax_attention, store_rows, tl, triton, triton_usable)

__all__ = ["vertical_slash_attention", "vertical_slash_reference", "vertical_slash_mask", "vertical_slash_tiles_mask",
           "vertical_slash_plan"]

_PAD = 1 << 30  # tile start of an unused slot: sorts last and is never read (counts bound the loops)


# ----------------------------------------------------------------------------- reference
def vertical_slash_mask(vertical_index: torch.Tensor, slash_index: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """Boolean [B, H, Nq, Nk]: causal AND (key column in the vertical set OR offset in the slash set)."""
    bsz, h = vertical_index.shape[:2]
    dev = vertical_index.device
    i = torch.arange(nq, device=dev).unsqueeze(1)
    off = i + (nk - nq) - torch.arange(nk, device=dev).unsqueeze(0)                      # [Nq, Nk]
    cols = _lut(vertical_index, nk).bool()
    diag = _lut(slash_index, nk).bool()
    on_slash = diag[:, :, off.clamp(0, max(nk - 1, 0))] if nk else torch.zeros(bsz, h, nq, 0, dtype=torch.bool)
    return (off >= 0) & (cols.unsqueeze(2) | on_slash)


def vertical_slash_tiles_mask(vertical_index: torch.Tensor, slash_index: torch.Tensor, nq: int, nk: int,
                              block_size: int) -> torch.Tensor:
    """Boolean [B, H, Nq, Nk] of ``tiles=True``: causal AND (key inside one of its query block's
    greedy tiles OR key column in the vertical set)."""
    slashes = _sorted_unique(slash_index, nk, descending=True)
    tiles, count = _greedy_tiles_torch(slashes, nq, nk, block_size)                     # [B,H,M,S], [B,H,M]
    keys = torch.arange(nk, device=slash_index.device)
    used = torch.arange(tiles.shape[-1], device=keys.device) < count.unsqueeze(-1)
    inside = (used.unsqueeze(-1) & (keys >= tiles.unsqueeze(-1)) & (keys < tiles.unsqueeze(-1) + block_size)).any(-2)
    rows = inside.repeat_interleave(block_size, dim=2)[:, :, :nq]                       # [B,H,Nq,Nk]
    off = torch.arange(nq, device=keys.device).unsqueeze(1) + (nk - nq) - keys.unsqueeze(0)
    return (off >= 0) & (rows | _lut(vertical_index, nk).bool().unsqueeze(2))


def vertical_slash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical_index: torch.Tensor,
                             slash_index: torch.Tensor, block_size: int, scale: float,
                             tiles: bool = False) -> torch.Tensor:
    """Dense-mask ground truth (fp32 masked softmax, zero rows with no key). O(Nq*Nk) memory.

    With ``tiles=False`` the result does not depend on ``block_size`` (the exact pattern).
    """
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    mask = (vertical_slash_tiles_mask(vertical_index, slash_index, nq, nk, block_size) if tiles
            else vertical_slash_mask(vertical_index, slash_index, nq, nk))
    kf, vf = kv_heads_for(k, hq).float(), kv_heads_for(v, hq).float()
    return masked_softmax_attention((q.float() @ kf.transpose(-1, -2)) * scale, mask, vf).to(q.dtype)


# ----------------------------------------------------------------------------- index plan
def _lut(index: torch.Tensor, n: int) -> torch.Tensor:
    """int8 [B, H, n]: 1 where some entry of ``index`` [B, H, k] equals the position."""
    idx = index.long()
    idx = torch.where((idx >= 0) & (idx < n), idx, n)
    lut = torch.zeros(*index.shape[:2], n + 1, dtype=torch.int8, device=index.device)
    return lut.scatter(-1, idx, 1)[..., :n].contiguous()


def _sorted_unique(index: torch.Tensor, n: int, descending: bool) -> torch.Tensor:
    """Entries sorted, with out-of-range values and repeats replaced by a sentinel that sorts
    last (n ascending, -1 descending)."""
    fill = -1 if descending else n
    idx = index.long()
    idx = torch.where((idx >= 0) & (idx < n), idx, fill).sort(dim=-1, descending=descending).values
    if idx.shape[-1] > 1:
        rep = torch.cat([torch.zeros_like(idx[..., :1], dtype=torch.bool), idx[..., 1:] == idx[..., :-1]], dim=-1)
        idx = torch.where(rep, fill, idx).sort(dim=-1, descending=descending).values
    return idx


def _row_bounds(nq: int, nk: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: the shifted first and last row, i.e. the causal key limit of each row."""
    m = torch.arange(-(-nq // block_size), device=device)
    lo = m * block_size + (nk - nq)
    hi = torch.clamp(m * block_size + block_size, max=nq) - 1 + (nk - nq)
    return lo, hi


def _greedy_tiles_torch(slashes: torch.Tensor, nq: int, nk: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cover every slash's key range per query block with block_size-wide tiles, left to right.

    ``slashes`` [B, H, S] sorted descending (ascending key start), -1 = none. A slash whose range
    is already covered adds nothing; otherwise a tile starts at max(range start, current end),
    so tiles never overlap and each range lies inside the union. Vectorised over query blocks,
    sequential over slashes (the Triton ``_vs_tiles`` does the same on GPU).
    """
    bsz, h, ns = slashes.shape
    lo_row, hi_row = _row_bounds(nq, nk, block_size, slashes.device)
    mq = lo_row.shape[0]
    tiles = torch.full((bsz, h, mq, ns + 1), _PAD, dtype=torch.long, device=slashes.device)
    cur_end = torch.zeros(bsz, h, mq, dtype=torch.long, device=slashes.device)
    cnt = torch.zeros_like(cur_end)
    for s in range(ns):
        o = slashes[:, :, s:s + 1]
        hi = hi_row - o
        start = torch.maximum(torch.clamp(lo_row - o, min=0), cur_end)
        ok = (o >= 0) & (hi >= 0) & (hi >= cur_end)
        tiles.scatter_(-1, torch.where(ok, cnt, ns).unsqueeze(-1), start.unsqueeze(-1))
        cnt = cnt + ok.long()
        cur_end = torch.where(ok, start + block_size, cur_end)
    tiles = tiles[..., :ns]
    return tiles.masked_fill(torch.arange(ns, device=slashes.device) >= cnt.unsqueeze(-1), _PAD), cnt


def _uncovered_columns(verticals: torch.Tensor, tiles: torch.Tensor, nq: int, nk: int,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the verticals (ascending) that no tile covers and some row may see."""
    bsz, h, mq, ns = tiles.shape
    _, hi_row = _row_bounds(nq, nk, block_size, verticals.device)
    vals = verticals.unsqueeze(2).expand(bsz, h, mq, verticals.shape[-1]).contiguous()
    keep = (vals < nk) & (vals <= hi_row.view(1, 1, mq, 1))
    if ns:
        t = tiles.long().contiguous()
        p = torch.searchsorted(t, vals, right=True) - 1
        keep &= ~((p >= 0) & (t.gather(-1, p.clamp(min=0)) + block_size > vals))
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return vals.gather(-1, order).to(torch.int32).contiguous(), keep.sum(-1).to(torch.int32).contiguous()


def vertical_slash_plan(vertical_index: torch.Tensor, slash_index: torch.Tensor, nq: int, nk: int,
                        block_size: int) -> dict[str, torch.Tensor]:
    """The per-query-block visit lists, MInference's ``convert_vertical_slash_indexes`` analogue.

    Returns int32 ``tiles`` [B,H,M,S] / ``tile_count`` [B,H,M] (key start of each dense tile),
    ``cols`` [B,H,M,V] / ``col_count`` [B,H,M] (gathered columns), and the int8 lookup tables
    ``slash_lut`` / ``vert_lut`` [B,H,Nk] that mask tiles to the exact pattern.
    """
    slashes = _sorted_unique(slash_index, nk, descending=True)
    verticals = _sorted_unique(vertical_index, nk, descending=False)
    if triton_usable(slash_index, _vs_tiles) and slashes.shape[-1]:
        bsz, h, ns = slashes.shape
        mq = -(-nq // block_size)
        tiles = torch.full((bsz, h, mq, ns), _PAD, dtype=torch.int32, device=slashes.device)
        count = torch.empty((bsz, h, mq), dtype=torch.int32, device=slashes.device)
        lanes = 64
        torch.library.wrap_triton(_vs_tiles)[(-(-mq // lanes), bsz * h)](
            slashes.to(torch.int32).contiguous(), tiles, count, nq, nk, mq, ns, BLOCK=block_size, LANES=lanes)
    else:
        tiles, count = _greedy_tiles_torch(slashes, nq, nk, block_size)
        tiles, count = tiles.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    cols, col_count = _uncovered_columns(verticals, tiles, nq, nk, block_size)
    return dict(tiles=tiles, tile_count=count, cols=cols, col_count=col_count,
                slash_lut=_lut(slash_index, nk), vert_lut=_lut(vertical_index, nk))


# ----------------------------------------------------------------------------- CPU path
@torch.library.custom_op("tcompile::vertical_slash_attention_cpu", mutates_args=())
def vertical_slash_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical_index: torch.Tensor,
                                 slash_index: torch.Tensor, block_size: int, scale: float,
                                 tiles: bool = False) -> torch.Tensor:
    """Tiles + gathered columns in PyTorch; work scales with the pattern, not Nq*Nk.

    Opaque (never traced into), so lists are cut to the longest used one.
    """
    bsz, hq, nq, d = q.shape
    nk, bs = k.shape[2], block_size
    if nq == 0 or nk == 0:
        return q.new_zeros(q.shape)
    plan = vertical_slash_plan(vertical_index, slash_index, nq, nk, bs)
    mq = plan["tile_count"].shape[2]
    nt = int(plan["tile_count"].max()) if plan["tile_count"].numel() else 0
    nc = int(plan["col_count"].max()) if plan["col_count"].numel() else 0
    if nt + nc == 0:
        return q.new_zeros(q.shape)
    dev = q.device
    tile_keys = (plan["tiles"][..., :nt].long().unsqueeze(-1) + torch.arange(bs, device=dev)).flatten(-2)
    tile_ok = (torch.arange(nt, device=dev) < plan["tile_count"].long().unsqueeze(-1)).repeat_interleave(bs, dim=-1)
    col_ok = torch.arange(nc, device=dev) < plan["col_count"].long().unsqueeze(-1)
    keys = torch.cat([tile_keys, plan["cols"][..., :nc].long()], dim=-1)                  # [B,H,M,L]
    ok = torch.cat([tile_ok & (tile_keys < nk), col_ok], dim=-1)
    keys = torch.where(ok, keys, 0)
    in_tile = torch.arange(keys.shape[-1], device=dev) < nt * bs
    kf = kv_heads_for(k, hq).float().reshape(bsz * hq * nk, d)
    vf = kv_heads_for(v, hq).float().reshape(bsz * hq * nk, d)
    base = (torch.arange(bsz * hq, device=dev) * nk).view(bsz, hq, 1, 1)
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, mq * bs - nq)).reshape(bsz, hq, mq, bs, d)
    rows = torch.arange(mq * bs, device=dev).view(mq, bs) + (nk - nq)
    slut, vlut = plan["slash_lut"].bool(), plan["vert_lut"].bool()
    length = keys.shape[-1]
    chunk = max(1, (1 << 24) // max(1, bsz * hq * length * max(bs, d)))
    out = q.new_empty((bsz, hq, mq, bs, d), dtype=torch.float32)
    for m0 in range(0, mq, chunk):
        m1 = min(mq, m0 + chunk)
        kc, okc = keys[:, :, m0:m1], ok[:, :, m0:m1]
        sel = (kc + base).reshape(-1)
        kg = kf.index_select(0, sel).view(bsz, hq, m1 - m0, length, d)
        vg = vf.index_select(0, sel).view(bsz, hq, m1 - m0, length, d)
        off = rows[m0:m1].view(1, 1, -1, bs, 1) - kc.unsqueeze(-2)                        # [B,H,c,bs,L]
        hit = slut.gather(-1, off.clamp(0, nk - 1).flatten(2)).view(off.shape) | vlut.gather(-1, kc.flatten(2)).view(
            kc.shape).unsqueeze(-2)
        mask = okc.unsqueeze(-2) & (off >= 0) & (hit | ~in_tile | tiles)
        scores = (qf[:, :, m0:m1] @ kg.transpose(-1, -2)) * scale
        out[:, :, m0:m1] = masked_softmax_attention(scores, mask, vg)
    return out.reshape(bsz, hq, mq * bs, d)[:, :, :nq].to(q.dtype).contiguous()


@vertical_slash_attention_cpu.register_fake
def _(q, k, v, vertical_index, slash_index, block_size, scale, tiles=False):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _vs_tiles(SLASH, TILES, TCNT, NQ, NK, NUM_QB, NS, BLOCK: tl.constexpr, LANES: tl.constexpr):
        """Greedy tile cover, one lane per query block (see ``_greedy_tiles_torch``)."""
        bh = tl.program_id(1).to(tl.int64)
        m = tl.program_id(0) * LANES + tl.arange(0, LANES)
        lane = m < NUM_QB
        lo_row = m * BLOCK + (NK - NQ)
        hi_row = tl.minimum(m * BLOCK + BLOCK, NQ) - 1 + (NK - NQ)
        cur_end = tl.zeros([LANES], dtype=tl.int32)
        cnt = tl.zeros([LANES], dtype=tl.int32)
        out = TILES + (bh * NUM_QB + m) * NS
        for s in range(0, NS):
            o = tl.load(SLASH + bh * NS + s) + tl.zeros([LANES], dtype=tl.int32)  # vector: see _block_sparse_fwd
            hi = hi_row - o
            start = tl.maximum(tl.maximum(lo_row - o, 0), cur_end)
            ok = lane & (o >= 0) & (hi >= 0) & (hi >= cur_end)
            tl.store(out + cnt, start, mask=ok)
            cnt += ok.to(tl.int32)
            cur_end = tl.where(ok, start + BLOCK, cur_end)
        tl.store(TCNT + bh * NUM_QB + m, cnt, mask=lane)

    @triton.jit
    def _vs_fwd(Q, K, V, O, TILE_START, TCNT, COLS, CCNT, SLUT, VLUT, qk_scale,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                HQ, GROUP, NQ, NK, NUM_QB, NS, NV, HEAD_DIM,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, TILES: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // HQ).to(tl.int64)
        h = bh % HQ
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        lim = rows + (NK - NQ)  # causal: key j is visible to row i iff j <= lim
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        rmask = rows < NQ
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = K + b * skb + kvh * skh
        v_base = V + b * svb + kvh * svh
        lut = bh.to(tl.int64) * NK
        lst = (bh * NUM_QB + qb).to(tl.int64)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
        # block part: dense tiles over the slash lines, masked to slash offsets and verticals
        # (TILES: every causal key of the tile, as MInference's kernel)
        for t in range(0, tl.load(TCNT + lst)):
            keys = tl.load(TILE_START + lst * NS + t) + offs_n
            kmask = keys < NK
            pair = rmask[:, None] & kmask[None, :] & (keys[None, :] <= lim[:, None])
            if TILES:
                mask = pair
            else:
                on_slash = tl.load(SLUT + lut + (lim[:, None] - keys[None, :]), mask=pair, other=0)
                on_col = tl.load(VLUT + lut + keys, mask=kmask, other=0)
                mask = pair & ((on_slash != 0) | (on_col != 0)[None, :])
            k_t, v = load_kv_tile(k_base, v_base, keys, kmask, offs_d, dmask, skn, skd, svn, svd, DOT_FP32)
            acc, l_i, m_i = attend_tile(q, k_t, v, mask, acc, l_i, m_i, qk_scale, DOT_FP32)
        # column part: verticals outside every tile, BLOCK gathered columns at a time
        ccnt = tl.load(CCNT + lst)
        for c0 in range(0, ccnt, BLOCK):
            cm = c0 + offs_n < ccnt
            keys = tl.load(COLS + lst * NV + c0 + offs_n, mask=cm, other=0)
            mask = rmask[:, None] & cm[None, :] & (keys[None, :] <= lim[:, None])
            k_t, v = load_kv_tile(k_base, v_base, keys, cm, offs_d, dmask, skn, skd, svn, svd, DOT_FP32)
            acc, l_i, m_i = attend_tile(q, k_t, v, mask, acc, l_i, m_i, qk_scale, DOT_FP32)
        store_rows(O, b, h, rows, offs_d, rmask, dmask, sob, soh, som, sod, acc, l_i)
else:  # pragma: no cover
    _vs_tiles = _vs_fwd = None


@torch.library.triton_op("tcompile::vertical_slash_attention", mutates_args=())
def vertical_slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical_index: torch.Tensor,
                             slash_index: torch.Tensor, block_size: int, scale: float,
                             tiles: bool = False) -> torch.Tensor:
    """Causal vertical-slash attention. q [B,Hq,Nq,d]; k, v [B,Hkv,Nk,d]; vertical_index int32
    [B,Hq,V] (key columns); slash_index int32 [B,Hq,S] (offsets o >= 0: query i sees key
    i + (Nk-Nq) - o); ``tiles``: attend every causal key of the slash tiles (MInference's kernel)
    instead of the exact lines. Rows that see no key are zeros. Returns q's dtype.
    """
    bsz, hq, hkv, nq, nk, d = check_attention_inputs("vertical_slash_attention", q, k, v, block_size)
    vertical_index = check_index("vertical_slash_attention", "vertical_index", vertical_index, (bsz, hq), q)
    slash_index = check_index("vertical_slash_attention", "slash_index", slash_index, (bsz, hq), q)
    if vertical_index.dim() != 3 or slash_index.dim() != 3:
        raise ValueError("vertical_slash_attention: vertical_index must be [B,Hq,V] and slash_index [B,Hq,S], got "
                         f"{tuple(vertical_index.shape)} and {tuple(slash_index.shape)}")
    if not triton_usable(q, _vs_fwd):
        return torch.ops.tcompile.vertical_slash_attention_cpu(q, k, v, vertical_index, slash_index, block_size, scale,
                                                               tiles)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if nq == 0 or bsz * hq == 0:
        return out
    plan = vertical_slash_plan(vertical_index, slash_index, nq, nk, block_size)
    mq = plan["tile_count"].shape[2]
    for key, fill in (("tiles", _PAD), ("cols", 0)):  # a zero-width list would hand Triton a null pointer
        if plan[key].shape[3] == 0:
            plan[key] = torch.full((bsz, hq, mq, 1), fill, dtype=torch.int32, device=q.device)
    torch.library.wrap_triton(_vs_fwd)[(mq, bsz * hq)](
        q, k, v, out, plan["tiles"], plan["tile_count"], plan["cols"], plan["col_count"], plan["slash_lut"],
        plan["vert_lut"], scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, nq, nk, mq, plan["tiles"].shape[3], plan["cols"].shape[3], d, TILES=bool(tiles),
        **kernel_meta(q, block_size, d))
    return out
