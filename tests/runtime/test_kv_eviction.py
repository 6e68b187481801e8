"""KV eviction passes: the score rewrite, selection, capacity, and what each policy keeps."""
from __future__ import annotations

import math

import pytest
import torch

from tcompile.errors import PassOptionError
from tcompile.passes.attention_scores import attention_scores
from tcompile.passes.kv_ops import select
from tcompile.registry import parse_pipeline
from tcompile.runtime.lm_optimize import runtime_for

POLICIES = ["kv_streaming{tokens=8,sinks=2}", "kv_snapkv{tokens=8,window=3}", "kv_h2o{tokens=8}",
            "kv_tova{tokens=8}"]


def _ref_scores(q, k, mask, rows, kv_heads):
    """float64 loop: Σ over the last rows of softmax(q k^T / sqrt(d) + mask), mean over each group."""
    b, h, n, d = q.shape
    g = h // kv_heads
    out = torch.zeros(b, kv_heads, k.shape[2], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = k[bi, hi // (h // k.shape[1])]
            for r in range(n - rows if rows else 0, n):
                logits = q[bi, hi, r].double() @ kh.double().T / math.sqrt(d) + mask[bi, 0, r].double()
                out[bi, hi // g] += logits.softmax(-1) / g
    return out


@pytest.mark.parametrize("k_heads", [2, 4])
@pytest.mark.parametrize("rows", [0, 3])
def test_attention_scores_match_float64_loop(k_heads, rows):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, k_heads, 6, 8, generator=g)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    allowed[1, :, :2] = False                          # row 1: two pads on the left
    mask = torch.zeros(2, 1, 6, 6).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    got = attention_scores(q, k, mask, None, rows, kv_heads=2)
    want = _ref_scores(q, k, mask, rows, 2)
    if rows == 0:  # padding query rows (row 1, queries 0-1) see no key and must not vote
        for hi in range(4):
            for r in range(2):
                want[1, hi // 2] -= torch.full((6,), 1 / 6, dtype=torch.float64) / 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_select_keeps_top_entries_valid_first():
    priority = torch.tensor([[[5.0, 1.0, 3.0, 4.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]]])
    valid = torch.tensor([[False, True, True, True, True]])
    idx, new_valid = select(priority, valid, 3)
    assert idx.tolist() == [[[2, 3, 4], [2, 3, 4]]]          # slot 0 is empty: never kept
    idx, new_valid = select(priority[:, :, :3], torch.tensor([[False, True, True]]), 3)
    assert new_valid.tolist() == [[True, True, False]] and idx[0, 0, 2].item() == 0   # the empty slot goes last


@pytest.mark.parametrize("pipeline", POLICIES)
def test_cache_stays_at_capacity_while_decoding(llama_program, prompts, pipeline):
    runtime, records = runtime_for(llama_program, parse_pipeline(pipeline))
    ids, mask = prompts
    runtime.generate(ids, mask, max_new_tokens=10)
    s = runtime.last_stats
    assert s.capacity == 8 and s.cache_entries_after_prefill == 8 and s.peak_cache_entries == 8
    assert s.peak_cache_bytes == llama_program.spec.cache_bytes(3, 9)     # + the slot the next entry takes
    assert s.peak_cache_bytes / s.full_cache_bytes == pytest.approx(9 / 25)


@pytest.mark.parametrize("pipeline", POLICIES)
def test_grow_mode_compresses_once(llama_program, prompts, pipeline):
    runtime, _ = runtime_for(llama_program, parse_pipeline(pipeline.replace("}", ",decode=grow}")))
    ids, mask = prompts
    runtime.generate(ids, mask, max_new_tokens=10)
    assert runtime.last_stats.cache_entries_after_prefill == 8 and runtime.last_stats.peak_cache_entries == 8 + 9


@pytest.mark.parametrize("pipeline", ["kv_h2o{tokens=8}", "kv_tova{tokens=8}", "kv_snapkv{tokens=8,window=3}"])
def test_score_rewrite_leaves_logits_unchanged(llama_program, prompts, pipeline):
    ids, mask = prompts
    plain, _ = runtime_for(llama_program, [])
    scored, records = runtime_for(llama_program, parse_pipeline(pipeline))
    assert any(r.stats.get("score_outputs") == 2 for r in records)          # one per layer
    a, b = plain.prefill_fn(ids, mask), scored.prefill_fn(ids, mask)
    assert torch.equal(a[0], b[0]) and len(b) >= len(a)


def test_streaming_keeps_sinks_and_recent_and_matches_masked_attention(llama, llama_program, prompts):
    """After eviction, a decode step must equal the full model attending only to the kept entries."""
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_streaming{tokens=8,sinks=2,decode=grow}"))
    logits, cache = runtime._prefill(ids, mask, 8)
    for b, real in enumerate(mask.sum(1).tolist()):
        kept = sorted(p for p in cache.pos[b, 0, 0].tolist() if p >= 0)
        assert kept == [0, 1] + list(range(real - 6, real))
    token = logits.argmax(-1)
    ours = runtime._decode(token, cache, 8)
    # transformers: full prefill cache, then one step with the evicted entries masked out
    with torch.no_grad():
        pos = (mask.cumsum(1) - 1).clamp_min(0)                 # as generate() positions a padded row
        out = llama(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        n = ids.shape[1]
        keep = torch.zeros(3, n + 1, dtype=torch.bool)
        keep[:, n] = True
        for b, real in enumerate(mask.sum(1).tolist()):
            slots = torch.nonzero(mask[b]).flatten()
            for p in [0, 1] + list(range(real - 6, real)):
                keep[b, slots[p]] = True
        m4 = torch.zeros(3, 1, 1, n + 1).masked_fill(~keep[:, None, None], torch.finfo(torch.float32).min)
        ref = llama(input_ids=token[:, None], attention_mask=m4, position_ids=mask.sum(1, keepdim=True),
                    past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_snapkv_always_keeps_its_observation_window(llama_program, prompts):
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_snapkv{tokens=8,window=3}"))
    _, cache = runtime._prefill(ids, mask, 8)
    for layer in range(2):
        for b, real in enumerate(mask.sum(1).tolist()):
            for h in range(2):
                assert set(range(real - 3, real)) <= set(cache.pos[b, layer, h].tolist())


def test_h2o_accumulates_one_unit_of_attention_per_query(llama_program):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_h2o{tokens=12,decode=grow}"))
    runtime.generate(ids, max_new_tokens=1)
    _, cache = runtime._prefill(ids, torch.ones_like(ids), 12)
    torch.testing.assert_close(cache.state[:, 0].sum(-1), torch.full((1, 2), 12.0))   # 12 prompt queries
    runtime2, _ = runtime_for(llama_program, parse_pipeline("kv_h2o{tokens=12}"))
    _, cache2 = runtime2._prefill(ids, torch.ones_like(ids), 12)
    runtime2._decode(torch.tensor([3]), cache2, 13)
    torch.testing.assert_close(cache2.state[:, 1].sum(-1), torch.full((1, 2), 13.0))


def test_kv_budget_errors():
    with pytest.raises(PassOptionError, match="smaller than sinks \\+ window"):
        parse_pipeline("kv_streaming{tokens=3,sinks=4}")
    with pytest.raises(PassOptionError, match="ratio"):
        parse_pipeline("kv_snapkv{ratio=0}")
    with pytest.raises(PassOptionError, match="decode"):
        parse_pipeline("kv_tova{decode=sometimes}")
    with pytest.raises(PassOptionError, match="odd"):
        parse_pipeline("kv_snapkv{kernel=4}")


def test_kv_budget_errors_at_generate(llama_program, prompts):
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_streaming{tokens=40}"))
    with pytest.raises(ValueError, match="exceeds the prompt's 16 tokens"):
        runtime.generate(ids, mask, max_new_tokens=2)
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_snapkv{ratio=0.1,window=4}"))
    with pytest.raises(ValueError, match="fewer than sinks \\+ window"):
        runtime.generate(ids, mask, max_new_tokens=2)


def test_kv_pass_on_an_encoder_is_skipped_with_a_reason(tmp_path):
    from tcompile.capture import capture
    from tcompile.models.vision import tiny_bert
    from tcompile.pass_manager import PassManager
    model = tiny_bert()
    prog = capture(model, {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    _, (rec,) = PassManager(verify=False).run(prog, parse_pipeline("kv_h2o{ratio=0.5}"))
    assert rec.status == "skipped" and "causal LMs" in rec.reason


def test_pooling_centered_and_forward():
    from tcompile.passes.kv_ops import pool_scores
    s = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 0.0, 1.0]]])
    assert pool_scores(s, 3, "max").tolist() == [[[5.0, 5.0, 5.0, 0.0, 1.0, 1.0]]]
    assert pool_scores(s, 3, "max", forward=True).tolist() == [[[0.0, 5.0, 5.0, 5.0, 0.0, 1.0]]]
    torch.testing.assert_close(pool_scores(s, 3, "avg", forward=True),
                               torch.tensor([[[0.0, 5 / 3, 5 / 3, 5 / 3, 0.0, 1 / 3]]]))


def test_snapkv_shared_heads_keep_one_set_per_layer(llama_program, prompts):
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline("kv_snapkv{tokens=8,window=2,heads=shared,pool=max,"
                                                           "kernel=3,spread=forward}"))
    _, cache = runtime._prefill(ids, mask, 8)
    for layer in range(2):
        assert torch.equal(cache.pos[:, layer, 0].sort(-1).values, cache.pos[:, layer, 1].sort(-1).values)
