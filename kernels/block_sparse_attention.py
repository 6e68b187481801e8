"""Block-sparse FlashAttention forward: the custom op ``tcompile::block_sparse_attention``.

Each query block of ``block_size`` rows visits only the key blocks listed for it, with the
FlashAttention-2 online softmax (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", ICLR 2024) and fp32 accumulation. This is the kernel behind
MInference's block-sparse pattern (Jiang et al., "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024), generalised to GQA, ragged
lengths and non-causal attention.

Where it runs: on CUDA tensors the Triton kernel; on CPU tensors a gathered PyTorch path whose
work scales with the density (the dense-mask reference would be slower than dense SDPA), or
the Triton kernel itself when ``TRITON_INTERPRET=1`` (how the tests exercise it without a GPU).
``block_sparse_attention_reference`` builds the dense mask and is the ground truth.

This file also holds what the vertical-slash kernel shares: input checks, the dispatch rule and
the Triton tile update.
"""
from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional: without it every op runs its PyTorch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "dense_mask_from_blocks",
           "block_sparse_attention_cpu", "triton_usable", "masked_softmax_attention"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- shared helpers
def triton_usable(t: torch.Tensor, kernel: object | None = None) -> bool:
    """Whether the op should launch its Triton kernel for tensors on ``t``'s device.

    CUDA tensors always do (when triton is installed). CPU tensors do only under the Triton
    interpreter: ``TRITON_INTERPRET=1`` now and ``kernel`` jitted as an interpreted function
    (triton reads the variable when the kernel is decorated, so both must hold).
    """
    if triton is None:
        return False
    if t.device.type == "cuda":
        return True
    if t.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return kernel is None or type(kernel).__name__ == "InterpretedFunction"


def check_attention_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_size: int) -> tuple[int, int, int, int, int, int]:
    """Validate q [B,Hq,Nq,d], k/v [B,Hkv,Nk,d] and the block size; return (B, Hq, Hkv, Nq, Nk, d)."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{name}: block_size={block_size!r} must be a power of two >= 16 "
                         "(the Triton tiles are block_size x block_size)")
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"{name}: {n} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: {n} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    bsz, hq, nq, d = q.shape
    if k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"{name}: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    hkv, nk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{name}: {hq} query heads are not a multiple of {hkv} key/value heads "
                         "(GQA needs Hq % Hkv == 0)")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    return bsz, hq, hkv, nq, nk, d


def check_index(name: str, what: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Check an index tensor's leading shape and integer dtype; return it as contiguous int32."""
    if t.dtype in (torch.bool,) or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name}: {what} must be an integer tensor (int32), got {t.dtype}")
    if tuple(t.shape[:len(shape)]) != shape or t.dim() < len(shape):
        raise ValueError(f"{name}: {what} has shape {tuple(t.shape)}, expected leading dims {shape}")
    if t.device != like.device:
        raise ValueError(f"{name}: {what} is on {t.device} but q is on {like.device}")
    return t.to(torch.int32).contiguous()


def kv_heads_for(k: torch.Tensor, hq: int) -> torch.Tensor:
    """k [B,Hkv,N,d] -> [B,Hq,N,d]: query head h reads KV head h // (Hq // Hkv) (GQA)."""
    group = hq // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def masked_softmax_attention(scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(scores | mask) @ values in fp32; a row with no allowed key gives zeros."""
    scores = scores.masked_fill(~mask, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    p = torch.exp(scores - peak)
    denom = p.sum(dim=-1, keepdim=True)
    return (p @ values) / torch.where(denom > 0, denom, torch.ones_like(denom))


def causal_mask(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """[Nq, Nk] bottom-right aligned causal mask: query i sees key j iff j <= i + (Nk - Nq)."""
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    return j <= i + (nk - nq)


# ----------------------------------------------------------------------------- reference
def dense_mask_from_blocks(block_index: torch.Tensor, block_count: torch.Tensor, block_size: int,
                           nq: int, nk: int, causal: bool) -> torch.Tensor:
    """Boolean [B, H, Nq, Nk] mask: query block m sees the keys of the key blocks
    ``block_index[..., m, :block_count[..., m]]`` (out-of-range entries ignored), AND causal if asked."""
    bsz, h, mq, _ = block_index.shape
    nkb = -(-nk // block_size)
    t = torch.arange(block_index.shape[-1], device=block_index.device)
    idx = block_index.long()
    valid = (t < block_count.long().unsqueeze(-1)) & (idx >= 0) & (idx < nkb)
    blocks = torch.zeros(bsz, h, mq, nkb + 1, dtype=torch.bool, device=block_index.device)
    blocks = blocks.scatter(-1, torch.where(valid, idx, nkb), True)[..., :nkb]
    mask = blocks.repeat_interleave(block_size, dim=2)[:, :, :nq].repeat_interleave(block_size, dim=3)[..., :nk]
    return mask & causal_mask(nq, nk, mask.device) if causal else mask


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
                                     block_count: torch.Tensor, block_size: int, scale: float,
                                     causal: bool) -> torch.Tensor:
    """Dense-mask ground truth: fp32 masked softmax, zeros for rows with no key. O(Nq*Nk) memory."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    mask = dense_mask_from_blocks(block_index, block_count, block_size, nq, nk, causal)
    kf, vf = kv_heads_for(k, hq).float(), kv_heads_for(v, hq).float()
    out = masked_softmax_attention((q.float() @ kf.transpose(-1, -2)) * scale, mask, vf)
    return out.to(q.dtype)


@torch.library.custom_op("tcompile::block_sparse_attention_cpu", mutates_args=())
def block_sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
                               block_count: torch.Tensor, block_size: int, scale: float, causal: bool) -> torch.Tensor:
    """The CPU path: gather each query block's key blocks and attend to them only.

    Work and memory scale with the listed blocks, not with Nq*Nk, which is what lets sparse
    prefill beat dense SDPA on a CPU. An opaque op (never traced into), so it may size its
    buffers from the data: lists are cut to the longest used one. Query blocks go in chunks.
    """
    bsz, hq, nq, d = q.shape
    nk, bs = k.shape[2], block_size
    mq, nkb = block_index.shape[2], -(-nk // bs)
    tmax = int(block_count.clamp(0, block_index.shape[3]).max()) if block_count.numel() else 0
    if tmax == 0 or nk == 0 or nq == 0:
        return q.new_zeros(q.shape)
    pad_k = nkb * bs - nk
    kb = torch.nn.functional.pad(kv_heads_for(k, hq).float(), (0, 0, 0, pad_k)).reshape(bsz * hq * nkb, bs * d)
    vb = torch.nn.functional.pad(kv_heads_for(v, hq).float(), (0, 0, 0, pad_k)).reshape(bsz * hq * nkb, bs * d)
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, mq * bs - nq)).reshape(bsz, hq, mq, bs, d)
    idx = block_index[..., :tmax].long()
    valid = ((torch.arange(tmax, device=q.device) < block_count.long().unsqueeze(-1)) & (idx >= 0) & (idx < nkb))
    idx = torch.where(valid, idx, 0)
    flat = idx + (torch.arange(bsz * hq, device=q.device) * nkb).view(bsz, hq, 1, 1)
    key_pos = (idx.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).flatten(-2)    # [B,H,M,T*bs]
    key_ok = valid.repeat_interleave(bs, dim=-1) & (key_pos < nk)
    rows = torch.arange(mq * bs, device=q.device).view(mq, bs)
    chunk = max(1, (1 << 24) // max(1, bsz * hq * tmax * bs * max(bs, d)))
    out = q.new_empty((bsz, hq, mq, bs, d), dtype=torch.float32)
    for m0 in range(0, mq, chunk):
        m1 = min(mq, m0 + chunk)
        sel = flat[:, :, m0:m1].reshape(-1)
        kg = kb.index_select(0, sel).view(bsz, hq, m1 - m0, tmax * bs, d)
        vg = vb.index_select(0, sel).view(bsz, hq, m1 - m0, tmax * bs, d)
        mask = key_ok[:, :, m0:m1].unsqueeze(-2)                                            # [B,H,c,1,T*bs]
        if causal:
            mask = mask & (key_pos[:, :, m0:m1].unsqueeze(-2) <= rows[m0:m1].view(1, 1, -1, bs, 1) + (nk - nq))
        scores = (qf[:, :, m0:m1] @ kg.transpose(-1, -2)) * scale
        out[:, :, m0:m1] = masked_softmax_attention(scores, mask.expand_as(scores), vg)
    return out.reshape(bsz, hq, mq * bs, d)[:, :, :nq].to(q.dtype).contiguous()


@block_sparse_attention_cpu.register_fake
def _(q, k, v, block_index, block_count, block_size, scale, causal):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def attend_tile(q, k_t, v, mask, acc, l_i, m_i, qk_scale, DOT_FP32: tl.constexpr):
        """One FlashAttention-2 step: fold a [BM, BN] score tile into (acc, l_i, m_i).

        q [BM, D], k_t [D, BN], v [BN, D]. fp32 operands (interpreter, fp32 inputs) use IEEE
        dots; half inputs use tensor-core dots with fp32 accumulation, as FlashAttention does.
        """
        if DOT_FP32:
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        s = tl.where(mask, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def load_kv_tile(k_base, v_base, keys, kmask, offs_d, dmask, skn, skd, svn, svd, DOT_FP32: tl.constexpr):
        """K^T [D, BN] and V [BN, D] of the keys ``keys`` (masked lanes read zeros), in the dot dtype."""
        k_t = tl.load(k_base + keys[None, :] * skn + offs_d[:, None] * skd, mask=kmask[None, :] & dmask[:, None],
                      other=0.0)
        v = tl.load(v_base + keys[:, None] * svn + offs_d[None, :] * svd, mask=kmask[:, None] & dmask[None, :],
                    other=0.0)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        return k_t, v

    @triton.jit
    def store_rows(O, b, h, rows, offs_d, rmask, dmask, sob, soh, som, sod, acc, l_i):
        """Normalise the online-softmax accumulator and store it; rows that saw no key are zeros."""
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _block_sparse_fwd(Q, K, V, O, BIDX, BCNT, qk_scale,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                          HQ, GROUP, NQ, NK, NUM_QB, NUM_KB, MAX_BLOCKS, HEAD_DIM,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                          DOT_FP32: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // HQ).to(tl.int64)
        h = bh % HQ
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        rows = qb * BLOCK + tl.arange(0, BLOCK)
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
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        m_i = tl.full([BLOCK], -1.0e30, dtype=tl.float32)  # finite: a keyless row keeps alpha = 1
        lst = bh * NUM_QB + qb
        cnt = tl.minimum(tl.load(BCNT + lst), MAX_BLOCKS)
        for t in range(0, cnt):
            # an out-of-range entry becomes block -1 or NUM_KB, whose keys all fail the mask
            # (vector masks only: the interpreter mis-types vector & scalar-bool)
            kb = tl.minimum(tl.maximum(tl.load(BIDX + lst.to(tl.int64) * MAX_BLOCKS + t), -1), NUM_KB)
            keys = kb * BLOCK + offs_n
            kmask = (keys >= 0) & (keys < NK)
            k_t, v = load_kv_tile(k_base, v_base, keys, kmask, offs_d, dmask, skn, skd, svn, svd, DOT_FP32)
            mask = rmask[:, None] & kmask[None, :]
            if CAUSAL:
                mask = mask & (keys[None, :] <= rows[:, None] + (NK - NQ))
            acc, l_i, m_i = attend_tile(q, k_t, v, mask, acc, l_i, m_i, qk_scale, DOT_FP32)
        store_rows(O, b, h, rows, offs_d, rmask, dmask, sob, soh, som, sod, acc, l_i)
else:  # pragma: no cover
    attend_tile = load_kv_tile = store_rows = _block_sparse_fwd = None


def kernel_meta(q: torch.Tensor, block_size: int, d: int) -> dict[str, object]:
    """Compile-time parameters shared by the attention kernels."""
    interp = q.device.type == "cpu"
    return dict(BLOCK=block_size, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
                DOT_FP32=bool(interp or q.dtype == torch.float32),
                num_warps=4 if block_size * max(16, d) <= 64 * 64 else 8, num_stages=2)


@torch.library.triton_op("tcompile::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor,
                           block_count: torch.Tensor, block_size: int, scale: float, causal: bool) -> torch.Tensor:
    """Block-sparse attention. q [B,Hq,Nq,d]; k, v [B,Hkv,Nk,d]; block_index int32
    [B,Hq,ceil(Nq/block_size),T]; block_count int32 [B,Hq,ceil(Nq/block_size)].

    Query block m attends to key blocks ``block_index[b,h,m,:block_count[b,h,m]]`` (entries
    outside [0, ceil(Nk/block_size)) are ignored; a block must not be listed twice). Causal
    masking is bottom-right aligned. Rows that see no key are zeros. Returns q's dtype.
    """
    bsz, hq, hkv, nq, nk, d = check_attention_inputs("block_sparse_attention", q, k, v, block_size)
    mq = -(-nq // block_size)
    block_index = check_index("block_sparse_attention", "block_index", block_index, (bsz, hq, mq), q)
    block_count = check_index("block_sparse_attention", "block_count", block_count, (bsz, hq, mq), q)
    if block_index.dim() != 4 or block_count.dim() != 3:
        raise ValueError("block_sparse_attention: block_index must be [B,Hq,M,T] and block_count [B,Hq,M], "
                         f"got {tuple(block_index.shape)} and {tuple(block_count.shape)}")
    if not triton_usable(q, _block_sparse_fwd):
        return torch.ops.tcompile.block_sparse_attention_cpu(q, k, v, block_index, block_count, block_size,
                                                             scale, causal)
    if block_index.shape[3] == 0 or nk == 0:  # nothing to visit (and no null pointer for Triton)
        return q.new_zeros(q.shape)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if nq == 0 or bsz * hq == 0:
        return out
    torch.library.wrap_triton(_block_sparse_fwd)[(mq, bsz * hq)](
        q, k, v, out, block_index, block_count, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, nq, nk, mq, -(-nk // block_size), block_index.shape[3], d,
        CAUSAL=causal, **kernel_meta(q, block_size, d))
    return out


def default_scale(d: int) -> float:
    """1/sqrt(d), SDPA's default."""
    return 1.0 / math.sqrt(d)
