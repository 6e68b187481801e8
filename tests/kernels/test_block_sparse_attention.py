"""tcompile::block_sparse_attention: the Triton kernel (interpreter on CPU), the CPU path, the
dense-mask reference and dense SDPA agree; bad inputs raise."""
from __future__ import annotations

import math

import pytest
import torch

from kernel_helpers import TOL, qkv, rel_err, sdpa_masked
from tcompile.kernels.block_sparse_attention import (block_sparse_attention, block_sparse_attention_reference,
                                                     dense_mask_from_blocks)


def random_blocks(b: int, h: int, nq: int, nk: int, bs: int, causal: bool, seed: int, density: float = 0.5,
                  empty_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random block lists (diagonal block always in, others with prob ``density``), padded with -1."""
    g = torch.Generator().manual_seed(seed)
    mq, nkb = -(-nq // bs), -(-nk // bs)
    idx = torch.full((b, h, mq, nkb), -1, dtype=torch.int32)
    cnt = torch.zeros((b, h, mq), dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for m in range(mq):
                last = min(nkb - 1, (min(nq, (m + 1) * bs) - 1 + nk - nq) // bs) if causal else nkb - 1
                pick = [n for n in range(max(last, 0) + 1) if n == last or torch.rand(1, generator=g) < density]
                if empty_rows and m % 2 == 1:
                    pick = []
                perm = torch.randperm(len(pick), generator=g).tolist()  # the kernel must not need sorted lists
                for t, p in enumerate(perm):
                    idx[bi, hi, m, t] = pick[p]
                cnt[bi, hi, m] = len(pick)
    return idx, cnt


CASES = [  # b, hq, hkv, nq, nk
    (1, 4, 2, 37, 37),   # ragged, GQA 2
    (2, 3, 1, 64, 64),   # Hq/Hkv = 3
    (1, 3, 1, 16, 16),   # a single block
    (1, 4, 2, 20, 45),   # Nq < Nk (bottom-right causal), ragged both
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_and_sdpa(device, case, causal, dtype):
    b, hq, hkv, nq, nk = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, dtype, device, seed=nq + nk)
    idx, cnt = random_blocks(b, hq, nq, nk, 16, causal, seed=nq)
    scale = 1 / math.sqrt(16)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 16, scale, causal)
    assert out.dtype == dtype and out.shape == q.shape
    ref = block_sparse_attention_reference(q, k, v, idx.to(device), cnt.to(device), 16, scale, causal)
    mask = dense_mask_from_blocks(idx, cnt, 16, nq, nk, causal)
    dense, rows = sdpa_masked(q, k, v, mask, scale)
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(out, dense, rows.to(device)) <= TOL[dtype]
    assert torch.all(out[~rows.to(device)] == 0)


@pytest.mark.parametrize("case", CASES[:2])
def test_cpu_path_matches_reference(cpu_path, case):
    b, hq, hkv, nq, nk = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, torch.float32, torch.device("cpu"), seed=3)
    for causal in (True, False):
        idx, cnt = random_blocks(b, hq, nq, nk, 16, causal, seed=5, empty_rows=True)
        out = block_sparse_attention(q, k, v, idx, cnt, 16, 0.25, causal)
        ref = block_sparse_attention_reference(q, k, v, idx, cnt, 16, 0.25, causal)
        assert rel_err(out, ref) <= 1e-5


def test_empty_lists_give_zeros(device):
    q, k, v = qkv(1, 4, 2, 37, 37, 16, torch.float32, device)
    idx, cnt = random_blocks(1, 4, 37, 37, 16, True, seed=1, empty_rows=True)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 16, 0.25, True)
    assert torch.all(out[:, :, 16:32] == 0) and out[:, :, :16].abs().sum() > 0
    none = block_sparse_attention(q, k, v, idx.to(device), torch.zeros_like(cnt).to(device), 16, 0.25, True)
    assert torch.all(none == 0)


def test_bf16_runs(device):
    q, k, v = qkv(1, 4, 2, 37, 37, 16, torch.bfloat16, device)
    idx, cnt = random_blocks(1, 4, 37, 37, 16, True, seed=2)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 16, 0.25, True)
    ref = block_sparse_attention_reference(q, k, v, idx.to(device), cnt.to(device), 16, 0.25, True)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("n", [16, 37, 64])
def test_full_density_equals_dense_causal(device, n):
    q, k, v = qkv(1, 3, 1, n, n, 16, torch.float32, device, seed=n)
    mq = -(-n // 16)
    idx = torch.arange(mq, dtype=torch.int32).expand(1, 3, mq, mq).contiguous()
    cnt = torch.full((1, 3, mq), mq, dtype=torch.int32)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 16, 0.25, True)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                             is_causal=True, scale=0.25)
    assert rel_err(out, dense) <= 1e-5


def test_block_size_32_and_non_contiguous_inputs(device):
    q, k, v = qkv(1, 4, 2, 70, 70, 16, torch.float32, device)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # [B,N,H,d] storage
    idx, cnt = random_blocks(1, 4, 70, 70, 32, True, seed=9)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 32, 0.25, True)
    ref = block_sparse_attention_reference(q, k, v, idx.to(device), cnt.to(device), 32, 0.25, True)
    assert rel_err(out, ref) <= 1e-5


def test_bad_inputs_raise():
    q, k, v = qkv(1, 3, 2, 32, 32, 16, torch.float32, torch.device("cpu"))
    idx = torch.zeros(1, 3, 2, 1, dtype=torch.int32)
    cnt = torch.ones(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attention(q, k, v, idx, cnt, 16, 0.25, True)
    q, k, v = qkv(1, 4, 2, 32, 32, 16, torch.float32, torch.device("cpu"))
    idx = torch.zeros(1, 4, 2, 1, dtype=torch.int32)
    cnt = torch.ones(1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, idx, cnt, 24, 0.25, True)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, idx, cnt, 8, 0.25, True)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k.half(), v.half(), idx, cnt, 16, 0.25, True)
    with pytest.raises(ValueError, match="block_index"):
        block_sparse_attention(q, k, v, idx[:, :, :1], cnt, 16, 0.25, True)
    with pytest.raises(ValueError, match="integer"):
        block_sparse_attention(q, k, v, idx.float(), cnt, 16, 0.25, True)


def test_sequence_shorter_than_one_block(device):
    q, k, v = qkv(1, 3, 1, 10, 10, 16, torch.float16, device)
    idx, cnt = torch.zeros(1, 3, 1, 1, dtype=torch.int32), torch.ones(1, 3, 1, dtype=torch.int32)
    out = block_sparse_attention(q, k, v, idx.to(device), cnt.to(device), 16, 0.25, True)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1),
                                                             v.float().repeat_interleave(3, 1), is_causal=True,
                                                             scale=0.25)
    assert rel_err(out, dense) <= TOL[torch.float16]
