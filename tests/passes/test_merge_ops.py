"""The vectorised merge/prune math against the float64 loop references."""
from __future__ import annotations

import pytest
import torch

from tcompile.passes.merge_ops import pitome_merge, tome_merge
from tcompile.passes.prune_ops import attention_probs, importance, prune_tokens
from tcompile.passes.token_state import unmerge
from reference import ref_evit, ref_pitome, ref_tome


def _inputs(b=2, n=17, c=8, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return x, k, torch.ones(b, n, 1, dtype=torch.float64)


@pytest.mark.parametrize("n,r,protect", [(17, 4, 1), (16, 7, 0), (17, 8, 1), (10, 1, 2)])
def test_tome_matches_reference(n, r, protect):
    x, k, s = _inputs(n=n)
    out, sizes, _ = tome_merge(x, k, s, None, r, protect)
    assert out.shape == (2, n - r, 8)
    for b in range(2):
        rx, rs = ref_tome(x[b], k[b], s[b, :, 0], r, protect)
        torch.testing.assert_close(out[b], rx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sizes[b, :, 0], rs)
    assert torch.all(sizes.sum(1) == n)          # Σs = N0
    torch.testing.assert_close(out[:, :protect], x[:, :protect])  # protected tokens untouched


@pytest.mark.parametrize("n,r,protect", [(17, 4, 1), (16, 8, 0), (21, 5, 1)])
def test_pitome_matches_reference(n, r, protect):
    x, k, s = _inputs(n=n, seed=3)
    out, sizes, _ = pitome_merge(x, k, s, None, r, protect, 0.5)
    for b in range(2):
        rx, rs = ref_pitome(x[b], k[b], s[b, :, 0], r, protect, 0.5)
        torch.testing.assert_close(out[b], rx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sizes[b, :, 0], rs)


@pytest.mark.parametrize("fn,ref,args", [(tome_merge, ref_tome, ()), (pitome_merge, ref_pitome, (0.5,))])
@pytest.mark.parametrize("pads,r", [(3, 5), (5, 2), (6, 6), (9, 4)])
def test_padding_merges_first_then_matches_reference(fn, ref, args, pads, r):
    """Pads (size 0) leave first, from either side of the split; the real tokens that remain and
    their sizes match the reference (which pads remain is arbitrary, so only real rows compare)."""
    x, k, s = _inputs(n=21, seed=11)
    s[0, -pads:] = 0.0
    out, sizes, _ = fn(x, k, s, None, r, 1, *args)
    for b in range(2):
        rx, rs = ref(x[b], k[b], s[b, :, 0], r, 1, *args)
        real = sizes[b, :, 0] > 0
        torch.testing.assert_close(out[b][real], rx[rs > 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sizes[b, real, 0], rs[rs > 0])
    assert int((sizes[0, :, 0] == 0).sum()) == max(pads - r, 0)     # pads went before any real token
    if pads >= r:                                                       # only pads merged: real rows exact
        torch.testing.assert_close(out[0][sizes[0, :, 0] > 0].sort(0).values, x[0, :21 - pads].sort(0).values)


def test_pitome_protects_lowest_energy_tokens():
    x, k, s = _inputs(n=21, seed=5)
    r, protect, margin = 5, 1, 0.5
    out, _, _ = pitome_merge(x, k, s, None, r, protect, margin)
    metric = k.mean(1)[:, protect:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    energy = torch.nn.functional.elu(metric @ metric.transpose(-1, -2) - margin).mean(-1)
    for b in range(2):
        low = energy[b].argsort(descending=True)[2 * r:]
        torch.testing.assert_close(out[b, protect:protect + len(low)], x[b, protect:][low])


@pytest.mark.parametrize("fn,args", [(tome_merge, ()), (pitome_merge, (0.4,))])
def test_unmerge_map_points_at_each_tokens_group(fn, args):
    x, k, s = _inputs(n=17, seed=7)
    src_map = torch.arange(17).expand(2, 17)
    out, sizes, m = fn(x, k, s, src_map, 5, 1, *args)
    # merging a second time composes the maps
    out2, sizes2, m2 = fn(out, k[:, :, :12], sizes, m, 3, 1, *args)
    assert m2.max() < out2.shape[1]
    # each group's size equals the number of original tokens mapped to it
    counts = torch.zeros(2, out2.shape[1], dtype=torch.float64).scatter_add(1, m2, torch.ones(2, 17, dtype=torch.float64))
    torch.testing.assert_close(counts, sizes2[..., 0])
    # a group's value is the size-weighted mean of its members' original values (one merge step)
    full = unmerge(out, m)
    for b in range(2):
        for g in range(out.shape[1]):
            members = (m[b] == g).nonzero().flatten()
            torch.testing.assert_close(x[b, members].mean(0), out[b, g])
            torch.testing.assert_close(full[b, members], out[b, g].expand(len(members), -1))


def test_pad_tokens_merge_first_and_never_change_real_tokens():
    x, k, s = _inputs(b=1, n=17, seed=9)
    s[0, 11:] = 0            # 6 pads; 3 of them fall in set A (even body positions 10, 12, 14)
    out, sizes, _ = tome_merge(x, k, s, None, 3, 1)
    assert float(sizes.sum()) == 11                 # real tokens keep their mass
    real_rows = out[0][sizes[0, :, 0] > 0]
    assert len(real_rows) == 11
    for i in range(11):                             # every real token passes through unchanged
        assert any(torch.equal(row, x[0, i]) for row in real_rows)


@pytest.mark.parametrize("fuse", [False, True])
def test_evit_matches_reference(fuse):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 17, 8, generator=g, dtype=torch.float64)
    q = torch.randn(2, 2, 17, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 17, 4, generator=g, dtype=torch.float64)
    s = torch.ones(2, 17, 1, dtype=torch.float64)
    probs = attention_probs(q, k, None, None, rows=1)
    out, sizes, _ = prune_tokens(x, importance(probs, 1), s, None, keep=10, protect=1, fuse=fuse)
    assert out.shape[1] == 1 + 10 + int(fuse)
    for b in range(2):
        rx, rs = ref_evit(x[b], q[b], k[b], s[b, :, 0], keep=10, protect=1, fuse=fuse)
        torch.testing.assert_close(out[b], rx, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sizes[b, :, 0], rs)
