"""tcompile::tome_match (ToMe's similarity + matching) against its reference, and
tome_merge_triton against merge_ops.tome_merge."""
from __future__ import annotations

import pytest
import torch

from tcompile.kernels.token_merge import tome_match, tome_match_reference, tome_merge_triton
from tcompile.passes.merge_ops import tome_merge


def unit(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("na,nb,c", [(37, 36, 24), (8, 8, 16), (70, 69, 80)])
def test_match_equals_reference(device, na, nb, c):
    a, b = unit(2, na, c, seed=1).to(device), unit(2, nb, c, seed=2).to(device)
    pad = torch.zeros(2, nb, dtype=torch.bool)
    pad[1, -3:] = True
    pad[1, 0] = True
    score, index = tome_match(a, b, pad.to(device), -1e4)
    ref_s, ref_i = tome_match_reference(a, b, pad.to(device), -1e4)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert torch.equal(index, ref_i)
    assert torch.allclose(score, ref_s, rtol=0, atol=1e-5)


def test_all_pads_pick_first(device):
    a, b = unit(1, 5, 16, seed=3).to(device), unit(1, 4, 16, seed=4).to(device)
    score, index = tome_match(a, b, torch.ones(1, 4, dtype=torch.bool, device=device), -1e4)
    assert torch.all(index == 0) and torch.all(score == -1e4)


def test_fp16_scores_close(device):
    a, b = unit(1, 33, 32, seed=5).half().to(device), unit(1, 32, 32, seed=6).half().to(device)
    pad = torch.zeros(1, 32, dtype=torch.bool, device=device)
    score, index = tome_match(a, b, pad, -1e4)
    exact = a.float() @ b.float().transpose(-1, -2)
    assert torch.allclose(score, exact.max(-1).values, atol=2e-3)
    assert torch.allclose(exact.gather(-1, index.unsqueeze(-1)).squeeze(-1), exact.max(-1).values, atol=2e-3)


@pytest.mark.parametrize("keys", [True, False])
def test_merge_equals_merge_ops(device, keys):
    g = torch.Generator().manual_seed(0)
    bsz, n, c = 2, 21, 32
    x = torch.randn(bsz, n, c, generator=g)
    k = torch.randn(bsz, 2, n, 16, generator=g) if keys else torch.randn(bsz, n, c, generator=g)
    sizes = torch.ones(bsz, n, 1)
    sizes[1, -4:] = 0  # padding
    src_map = torch.arange(n).expand(bsz, n).contiguous()
    want = tome_merge(x, k, sizes, src_map, 5, 1)
    got = tome_merge_triton(x.to(device), k.to(device), sizes.to(device), src_map.to(device), 5, 1)
    for w, gt in zip(want, got):
        assert torch.allclose(w, gt.cpu(), atol=1e-5)
