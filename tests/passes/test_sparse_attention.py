"""sparse_attention (MInference): exactness at density 1, pattern estimation, padding, errors, skips,
the CPU path against dense-mask references, and auto calibration."""
from __future__ import annotations

import math
import re

import pytest
import torch

from tcompile.errors import PassOptionError
from tcompile.models.lm import tiny_llama
from tcompile.pass_manager import PassManager
from tcompile.passes import sparse_ops
from tcompile.passes.sparse_attention import SparseAttentionOptions, calibrate, pattern_recalls
from tcompile.registry import PassSpec, parse_pipeline
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import runtime_for

OP = torch.ops.tcompile.sparse_prefill_attention.default
SMALL = "block=16,min_tokens=16,sinks=16,window=16,last_q=16"


@pytest.fixture(scope="module")
def program():
    return capture_lm(tiny_llama())


@pytest.fixture(scope="module")
def dense(program):
    return runtime_for(program, [])[0]


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _prefill(runtime, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return runtime.prefill_fn(ids, torch.ones_like(ids) if mask is None else mask)[0]


@pytest.mark.parametrize("pattern", ["vertical_slash", "a_shape", "block_topk", "auto", "vertical_slash,tiles=false"])
def test_density_one_equals_dense_prefill(program, dense, pattern):
    extra = ",table=avbd/dbva" if pattern == "auto" else ""
    runtime, records = runtime_for(program, parse_pipeline(f"sparse_attention{{pattern={pattern},density=1.0,"
                                                           f"{SMALL}{extra}}}"))
    assert sum(n.target is OP for n in runtime.prefill_fn.graph.nodes) == 2          # one op per layer
    assert records[0].status == "applied" and records[0].stats["sites"] == 2
    ids = _ids(200)
    torch.testing.assert_close(_prefill(runtime, ids), _prefill(dense, ids), rtol=0, atol=1e-5)


def test_sparse_prefill_changes_logits_below_density_one(program, dense):
    runtime, _ = runtime_for(program, parse_pipeline(f"sparse_attention{{density=0.2,{SMALL}}}"))
    ids = _ids(256, seed=1)
    got, ref = _prefill(runtime, ids), _prefill(dense, ids)
    assert torch.isfinite(got).all() and (got - ref).abs().max() > 1e-4
    short = ids[:, :12]                                            # below min_tokens: dense, identical
    torch.testing.assert_close(_prefill(runtime, short), _prefill(dense, short), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_left_padding_matches_unpadded_rows(program, dense, density):
    runtime, _ = runtime_for(program, parse_pipeline(f"sparse_attention{{density={density},{SMALL}}}"))
    ids = _ids(160, seed=2, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    mask[2, :60] = 0
    batched = _prefill(runtime, ids, mask)
    for row in range(3):
        alone = ids[row:row + 1, int((mask[row] == 0).sum()):]
        torch.testing.assert_close(batched[row], _prefill(runtime, alone)[0], rtol=0, atol=1e-5)
        if density == 1.0:
            torch.testing.assert_close(batched[row], _prefill(dense, alone)[0], rtol=0, atol=1e-5)


def test_hot_column_and_diagonal_are_selected():
    g = torch.Generator().manual_seed(0)
    n, d = 512, 32
    r = torch.nn.functional.normalize(torch.randn(n + 64, d, generator=g), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = r[:n] + 0.5 * u
    k = 0.1 * torch.randn(n, d, generator=g)
    k[300] = 10 * u                                            # every query meets key 300
    k[:250] += 6 * r[37:37 + 250]                              # query i meets key i - 37 (offset 37)
    q, k, kv_of = q[None].expand(2, n, d).contiguous(), k[None], torch.zeros(2, dtype=torch.long)
    vertical, slash = sparse_ops.vertical_slash_indices(q, k, kv_of, density=0.2, block=16, sinks=0, window=1,
                                                        last_q=64, scale=1.0)
    assert (vertical == 300).any(1).all() and (slash == 0).any(1).all()          # offset 0 is always kept
    vertical, slash = sparse_ops.vertical_slash_indices(q[:, :300], k[:, :300], kv_of, density=0.3, block=16,
                                                        sinks=0, window=1, last_q=64, scale=1.0)
    assert (slash == 37).any(1).all() and not (vertical == 37).any()


def test_block_topk_picks_the_hot_key_block():
    g = torch.Generator().manual_seed(0)
    n, d, block = 256, 16, 16
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = (u + 0.1 * torch.randn(1, n, d, generator=g))
    k = 0.1 * torch.randn(1, n, d, generator=g)
    k[0, 5 * block:6 * block] += 5 * u                         # key block 5 is hot for every query block
    index, count = sparse_ops.block_topk_indices(q, k, torch.zeros(1, dtype=torch.long), density=0.2, sinks=0,
                                                 window=0, block=block)
    for m in range(6, n // block):
        kept = index[0, m, :count[0, m]].tolist()
        assert 5 in kept and m in kept and len(kept) == math.ceil(0.2 * (m + 1) - 1e-9)


@pytest.mark.parametrize("code", ["v", "b", "a", "tiles"])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_cpu_path_matches_dense_mask_reference(code, use_kernels):
    from tcompile.kernels.block_sparse_attention import block_sparse_attention_reference
    from tcompile.kernels.vertical_slash import vertical_slash_reference
    g = torch.Generator().manual_seed(4)
    h, hk, n, d, block = 4, 2, 300, 16, 16
    q, k, v = (torch.randn(hh, n, d, generator=g) for hh in (h, hk, hk))
    kv_of = torch.arange(h) // 2
    tiles, code = code == "tiles", "v" if code == "tiles" else code
    indices = sparse_ops.estimate(code, q, k, kv_of, 0.25, block, 16, 32, 16, 0.25)
    got = sparse_ops.attend(q, k, v, code, 0.25, block, 16, 32, 16, 0.25, use_kernels=use_kernels, tiles=tiles)
    kind = ("vertical_slash_tiles" if tiles else "vertical_slash") if code == "v" else "blocks"
    mask = sparse_ops.pattern_mask(kind, indices, n, block)
    assert 0.02 < mask.float().mean() / 0.5 < 0.6                  # genuinely sparse (causal half ≈ 0.5)
    own = torch.softmax((q @ k[kv_of].transpose(1, 2) * 0.25).masked_fill(~mask, float("-inf")), -1) @ v[kv_of]
    if not (tiles and use_kernels):     # the kernel's tiles are its greedy cover, not the CPU path's ranges
        torch.testing.assert_close(got, own, rtol=0, atol=1e-5)
    ints = [t.to(torch.int32)[None] for t in indices]
    if code == "v":
        ref = vertical_slash_reference(q[None], k[None], v[None], *ints, block, 0.25, tiles)[0]
        if tiles and not use_kernels:   # CPU ranges hold the kernel's tiles: at least that much mass, not equal
            return
    else:
        ref = block_sparse_attention_reference(q[None], k[None], v[None], *ints, block, 0.25, True)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_sequence_shorter_than_one_block_is_exact():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, hh, 10, 8, generator=g) for hh in (4, 2, 2))
    dense_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for min_tokens in (0, 256):                                    # forced sparse path, and the dense fallback
        got = OP(q, k, v, None, "v", 0.1, 64, 64, 64, 64, min_tokens, -1.0, False)
        torch.testing.assert_close(got, dense_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text, message", [
    ("pattern=diagonal", "pattern='diagonal' is unknown"), ("density=0", "must lie in (0, 1]"),
    ("density=1.5", "must lie in (0, 1]"), ("block=48", "power of two"), ("block=8", "power of two"),
    ("last_q=0", "last_q=0"), ("sinks=-1", "non-negative"), ("recall=0", "recall=0"),
    ("table=vv", "table is the per-head choice"), ("pattern=auto,table=vx", "pattern codes"),
    ("tiles=2", "tiles=2"), ("min_tokens=32", "shorter than one block (64 tokens)"),
])
def test_bad_options_raise(text, message):
    with pytest.raises(PassOptionError, match=re.escape(message)):
        parse_pipeline(f"sparse_attention{{{text}}}")


def test_auto_without_table_and_table_of_wrong_shape_raise(program):
    with pytest.raises(PassOptionError, match="calibrate"):
        runtime_for(program, [PassSpec.make("sparse_attention", pattern="auto")])
    with pytest.raises(PassOptionError, match="1 layers"):
        runtime_for(program, [PassSpec.make("sparse_attention", pattern="auto", table="vvvv")])
    with pytest.raises(ValueError, match="fewer than four blocks of 64"):
        calibrate(program, _ids(100))


def test_decode_and_non_lm_graphs_are_skipped_with_reasons(program, vit_program):
    _, records = runtime_for(program, parse_pipeline("sparse_attention"))
    assert [r.status for r in records] == ["applied", "skipped"]
    assert "prefill step only" in records[1].reason
    _, vit_records = PassManager(verify=False).run(vit_program, parse_pipeline("sparse_attention"))
    assert vit_records[0].status == "skipped" and "not a causal-LM prefill" in vit_records[0].reason


def test_auto_calibration_builds_a_replayable_table(program, dense):
    ids = _ids(256, seed=6)
    options = SparseAttentionOptions(density=0.4, block=16, sinks=16, window=16, last_q=16, recall=0.9,
                                     min_tokens=16)
    recalls = pattern_recalls(program, ids, options)
    assert recalls.shape == (2, 3, 4) and ((recalls > 0) & (recalls <= 1 + 1e-5)).all()
    full = pattern_recalls(program, ids, SparseAttentionOptions(density=1.0, block=16))
    torch.testing.assert_close(full, torch.ones_like(full))
    tuned = calibrate(program, ids, options)
    layers = tuned.table.split("/")
    assert tuned.pattern == "auto" and len(layers) == 2 and all(len(x) == 4 for x in layers)
    spec = parse_pipeline(str(PassSpec("sparse_attention", tuned)))[0]             # the text form replays it
    assert spec.options == tuned
    runtime, _ = runtime_for(program, [spec])
    assert torch.isfinite(_prefill(runtime, ids)).all()
