"""tcompile::vertical_slash_attention: Triton kernel (interpreter on CPU), CPU path, dense-mask
reference and dense SDPA agree; the tile plan covers every slash exactly once."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import TOL, qkv, rel_err, sdpa_masked
from tcompile.kernels import vertical_slash as vs
from tcompile.kernels.vertical_slash import vertical_slash_attention, vertical_slash_mask, vertical_slash_reference


def random_pattern(b: int, h: int, nk: int, nv: int, ns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random columns and offsets with -1 padding, repeats and the local band, as MInference keeps."""
    g = torch.Generator().manual_seed(seed)
    vert = torch.randint(-1, nk, (b, h, nv), generator=g, dtype=torch.int32)
    slash = torch.randint(-1, nk, (b, h, ns), generator=g, dtype=torch.int32)
    slash[..., 0] = 0
    if ns > 2:
        slash[..., 1] = 1
        slash[..., 2] = slash[..., 1]  # a repeat must count once
    return vert, slash


CASES = [  # b, hq, hkv, nq, nk, nv, ns
    (1, 4, 2, 37, 37, 5, 6),
    (2, 3, 1, 64, 64, 8, 10),
    (1, 3, 1, 16, 16, 3, 3),
    (1, 4, 2, 20, 45, 4, 7),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_and_sdpa(device, case, dtype):
    b, hq, hkv, nq, nk, nv, ns = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, dtype, device, seed=nq)
    vert, slash = random_pattern(b, hq, nk, nv, ns, seed=nk)
    out = vertical_slash_attention(q, k, v, vert.to(device), slash.to(device), 16, 0.25)
    assert out.dtype == dtype and out.shape == q.shape
    ref = vertical_slash_reference(q, k, v, vert.to(device), slash.to(device), 16, 0.25)
    dense, rows = sdpa_masked(q, k, v, vertical_slash_mask(vert, slash, nq, nk), 0.25)
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(out, dense, rows.to(device)) <= TOL[dtype]
    assert torch.all(out[~rows.to(device)] == 0)


@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_reference(cpu_path, case):
    b, hq, hkv, nq, nk, nv, ns = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, torch.float32, torch.device("cpu"), seed=1)
    vert, slash = random_pattern(b, hq, nk, nv, ns, seed=2)
    for bs in (16, 32):
        out = vertical_slash_attention(q, k, v, vert, slash, bs, 0.25)
        assert rel_err(out, vertical_slash_reference(q, k, v, vert, slash, bs, 0.25)) <= 1e-5


def test_slash_only_vertical_only_and_empty(device):
    q, k, v = qkv(1, 4, 2, 37, 37, 16, torch.float32, device)
    none = torch.full((1, 4, 3), -1, dtype=torch.int32)
    vert, slash = random_pattern(1, 4, 37, 3, 5, seed=4)
    for vv, ss in ((none, slash), (vert, none)):
        out = vertical_slash_attention(q, k, v, vv.to(device), ss.to(device), 16, 0.25)
        assert rel_err(out, vertical_slash_reference(q, k, v, vv.to(device), ss.to(device), 16, 0.25)) <= 1e-5
    empty = vertical_slash_attention(q, k, v, none.to(device), none.to(device), 16, 0.25)
    assert torch.all(empty == 0)
    zero_width = torch.zeros(1, 4, 0, dtype=torch.int32)
    out = vertical_slash_attention(q, k, v, zero_width.to(device), slash.to(device), 16, 0.25)
    assert rel_err(out, vertical_slash_reference(q, k, v, zero_width.to(device), slash.to(device), 16, 0.25)) <= 1e-5


@pytest.mark.parametrize("n", [16, 37])
def test_all_slashes_equal_dense_causal(device, n):
    q, k, v = qkv(1, 3, 1, n, n, 16, torch.float32, device, seed=n)
    slash = torch.arange(n, dtype=torch.int32).flip(0).expand(1, 3, n).contiguous()
    vert = torch.arange(0, n, 5, dtype=torch.int32).expand(1, 3, -1).contiguous()  # all inside tiles
    out = vertical_slash_attention(q, k, v, vert.to(device), slash.to(device), 16, 0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                             is_causal=True, scale=0.25)
    assert rel_err(out, dense) <= 1e-5


def test_tile_plan_covers_slashes_once():
    """Triton's greedy cover equals the PyTorch one; tiles are disjoint and cover every slash range."""
    vert, slash = random_pattern(2, 3, 90, 6, 9, seed=7)
    nq = nk = 90
    plan = vs.vertical_slash_plan(vert, slash, nq, nk, 16)
    sl = vs._sorted_unique(slash, nk, descending=True)
    tiles, cnt = vs._greedy_tiles_torch(sl, nq, nk, 16)
    assert torch.equal(plan["tiles"].long(), tiles) and torch.equal(plan["tile_count"].long(), cnt)
    lo, hi = vs._row_bounds(nq, nk, 16, torch.device("cpu"))
    for b in range(2):
        for h in range(3):
            for m in range(lo.shape[0]):
                covered = torch.zeros(nk + 16, dtype=torch.int32)
                for t in tiles[b, h, m, :cnt[b, h, m]].tolist():
                    covered[t:t + 16] += 1
                assert covered.max() <= 1
                for o in sl[b, h].tolist():
                    if o >= 0 and hi[m] - o >= 0:
                        assert covered[max(lo[m] - o, 0):hi[m] - o + 1].min() == 1


def test_bad_inputs_raise():
    q, k, v = qkv(1, 3, 2, 32, 32, 16, torch.float32, torch.device("cpu"))
    idx = torch.zeros(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        vertical_slash_attention(q, k, v, idx, idx, 16, 0.25)
    q, k, v = qkv(1, 4, 2, 32, 32, 16, torch.float32, torch.device("cpu"))
    idx = torch.zeros(1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        vertical_slash_attention(q, k, v, idx, idx, 48, 0.25)
    with pytest.raises(ValueError, match="slash_index"):
        vertical_slash_attention(q, k, v, idx, idx[:, :2], 16, 0.25)


def test_bf16_and_shorter_than_one_block(device):
    q, k, v = qkv(1, 4, 2, 10, 10, 16, torch.bfloat16, device)
    vert, slash = random_pattern(1, 4, 10, 3, 4, seed=8)
    out = vertical_slash_attention(q, k, v, vert.to(device), slash.to(device), 16, 0.25)
    ref = vertical_slash_reference(q, k, v, vert.to(device), slash.to(device), 16, 0.25)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiles_mode_matches_tile_mask(device, case, dtype):
    """tiles=True (MInference's kernel): every causal key of a tile is attended, and the kernel
    equals dense SDPA under ``vertical_slash_tiles_mask`` (a superset of the exact pattern)."""
    b, hq, hkv, nq, nk, nv, ns = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, dtype, device, seed=nq + 1)
    vert, slash = random_pattern(b, hq, nk, nv, ns, seed=nk + 1)
    mask = vs.vertical_slash_tiles_mask(vert, slash, nq, nk, 16)
    assert bool((mask | ~vertical_slash_mask(vert, slash, nq, nk)).all())          # superset
    assert bool((mask & ~vertical_slash_mask(vert, slash, nq, nk)).any())          # and more than it
    out = vertical_slash_attention(q, k, v, vert.to(device), slash.to(device), 16, 0.25, True)
    dense, rows = sdpa_masked(q, k, v, mask, 0.25)
    assert rel_err(out, vertical_slash_reference(q, k, v, vert.to(device), slash.to(device), 16, 0.25, True)) \
        <= TOL[dtype]
    assert rel_err(out, dense, rows.to(device)) <= TOL[dtype]


def test_tiles_mode_cpu_path(cpu_path):
    b, hq, hkv, nq, nk, nv, ns = CASES[1]
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, torch.float32, torch.device("cpu"), seed=3)
    vert, slash = random_pattern(b, hq, nk, nv, ns, seed=5)
    for bs in (16, 32):
        out = vertical_slash_attention(q, k, v, vert, slash, bs, 0.25, True)
        assert rel_err(out, vertical_slash_reference(q, k, v, vert, slash, bs, 0.25, True)) <= 1e-5
