"""Speculative decoding: the verify step, exact greedy output for every drafter, the pass, errors."""
from __future__ import annotations

import pytest
import torch

import tcompile
from tcompile.errors import PassOptionError
from tcompile.registry import PassSpec, parse_pipeline
from tcompile.runtime import capture_lm
from tcompile.models.lm import tiny_gpt2, tiny_llama
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.runtime.drafters import DraftTree, PromptLookup, TokenRecycling, budget_tree
from tcompile.runtime.lm_optimize import runtime_for
from tcompile.runtime.speculative import SpeculativeRuntime, greedy_argmax, pack

NEW = 128


@pytest.fixture(scope="module")
def llama_spec(llama):
    return capture_lm(llama, verify=True)


@pytest.fixture(scope="module")
def gpt2_spec(gpt2):
    return capture_lm(gpt2, verify=True)


def _prefill_cache(runtime, ids, mask):
    logits, cache = runtime._prefill(ids, mask, None)
    return logits, cache


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_tree_verify_logits_equal_a_causal_forward_over_each_path(which, request):
    """E2's test: each node's logits from one tree-masked verify call equal the model's plain
    forward over the prompt plus that node's root-to-node path."""
    model, program = request.getfixturevalue(which), request.getfixturevalue(f"{which}_spec")
    runtime, _ = runtime_for(program, parse_pipeline("speculative{drafter=token_recycling}"), model)
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    _, cache = _prefill_cache(runtime, prompt, torch.ones_like(prompt))
    tree = DraftTree([5, 7, 9, 11, 13], [-1, -1, 0, 0, 2])    # root → {5 → {9 → 13, 11}, 7}
    ids, depth, anc = pack([tree], torch.tensor([3]))
    logits, slots = runtime._verify(cache, ids, depth, anc)
    assert logits.shape == (1, 6, 128) and slots.tolist() == [[9, 10, 11, 12, 13, 14]]
    paths = {0: [3], 1: [3, 5], 2: [3, 7], 3: [3, 5, 9], 4: [3, 5, 11], 5: [3, 5, 9, 13]}
    for node, path in paths.items():
        full = model(torch.cat([prompt, torch.tensor([path])], dim=1)).logits[0, -1]
        assert torch.allclose(logits[0, node], full, atol=1e-5), node


def test_rollback_is_bookkeeping_only(llama_spec, llama):
    runtime, _ = runtime_for(llama_spec, parse_pipeline("speculative{drafter=token_recycling}"), llama)
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    _, cache = _prefill_cache(runtime, prompt, torch.ones_like(prompt))
    buffers = [t.data_ptr() for t in cache.kv]
    trees = [DraftTree([1, 2, 3], [-1, -1, 1]), DraftTree([4], [-1])]
    ids, depth, anc = pack(trees, torch.tensor([7, 8]))
    _, slots = runtime._verify(cache, ids, depth, anc)
    runtime._commit(cache, slots, [[0, 2, 3], [0]])               # row 0 keeps root → 2 → 3 (compacted)
    assert [t.data_ptr() for t in cache.kv] == buffers           # written in place, no copy of the cache
    assert cache.valid.sum(1).tolist() == [9, 7] and cache.seen.tolist() == [9, 7]
    assert cache.pos[0, 0, 0, 6:9].tolist() == [6, 7, 8] and cache.pos[0, 0, 0, 9].item() == -1
    assert cache.pos[1, 0, 0, 6:8].tolist() == [6, -1]
    # row 0's compacted entries hold what a plain forward over the accepted tokens computes
    ref = runtime_for(llama_spec, [])[0]
    _, ref_cache = _prefill_cache(ref, torch.cat([prompt[:1], torch.tensor([[7, 2, 3]])], dim=1), torch.ones(1, 9, dtype=torch.long))
    assert torch.allclose(cache.kv[0][0, :, :9], ref_cache.kv[0][0, :, :9], atol=1e-5)


def _options(drafter: str, which: str, **extra) -> SpeculativeOptions:
    if drafter == "draft_model":   # a different random model of the same family and vocabulary
        extra = {"draft": (tiny_llama if which == "llama" else tiny_gpt2)(seed=1), "fallback": 0.0, **extra}
    if drafter == "layer_skip":
        extra = {"fallback": 0.0, **extra}
    return SpeculativeOptions(drafter=drafter, k=6, **extra)


@pytest.mark.parametrize("drafter", ["prompt_lookup", "token_recycling", "draft_model", "layer_skip"])
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_greedy_speculative_equals_plain_greedy(which, drafter, request, prompts):
    """Acceptance 1 on the tiny models: 128 new tokens, batch 3 (three prompt lengths) and 1."""
    model, program = request.getfixturevalue(which), request.getfixturevalue(f"{which}_spec")
    plain, _ = runtime_for(program, [])
    spec, _ = runtime_for(program, [PassSpec("speculative", _options(drafter, which))], model)
    ids, mask = prompts
    want = plain.generate(ids, mask, max_new_tokens=NEW)
    for _ in range(2):                       # token_recycling's matrix persists: cold, then hot start
        got = spec.generate(ids, mask, max_new_tokens=NEW)
        assert torch.equal(got, want)
    stats = spec.last_stats
    assert stats.new_tokens == NEW and stats.steps <= NEW - 1 and stats.drafted > 0
    one = spec.generate(ids[2:, 6:], max_new_tokens=NEW)
    assert torch.equal(one, plain.generate(ids[2:, 6:], max_new_tokens=NEW))


def test_rows_accept_different_lengths_and_stop_at_eos(llama_spec, llama, prompts):
    plain, _ = runtime_for(llama_spec, [])
    spec, _ = runtime_for(llama_spec, parse_pipeline("speculative{k=5}"), llama)
    ids, mask = prompts
    free = plain.generate(ids, mask, max_new_tokens=20)
    eos = int(free[0, 20])
    want = plain.generate(ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(spec.generate(ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0), want)
    for n in (1, 2, 3):
        assert torch.equal(spec.generate(ids, mask, max_new_tokens=n), plain.generate(ids, mask, max_new_tokens=n))


def test_prompt_lookup_prefers_longer_and_later_matches():
    d = PromptLookup(max_ngram=3, min_ngram=1)
    ctx = torch.tensor([1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3])
    assert d.lookup(ctx, 3) == [4, 5, 9]                 # the trigram 1 2 3 beats the later bigram 2 3
    assert d.lookup(torch.tensor([5, 2, 3, 6, 2, 3, 8, 2, 3]), 2) == [8, 2]    # the latest match
    assert d.lookup(torch.tensor([1, 2, 3]), 4) == []
    assert d.lookup(torch.tensor([4, 1, 2, 4]), 5) == [1, 2, 4]          # clipped at the end


def test_token_recycling_matrix_rows_hold_the_latest_top_k():
    d = TokenRecycling(vocab_size=50, top_k=3, paths=budget_tree(6, 3, 3))
    assert d.nbytes == 50 * 3 * 4
    assert d.propose([torch.tensor([1, 2])], 3)[0].size == 0          # nothing seen yet after 2
    logits = torch.randn(1, 2, 50)
    d.observe(torch.tensor([[2, 7]]), logits, [[0]])
    assert d.adjacency[2].tolist() == logits[0, 0].topk(3).indices.tolist()
    tree = d.propose([torch.tensor([1, 2])], 3)[0]
    assert tree.tokens[:2] == d.adjacency[2, :2].tolist() and all(p < i for i, p in enumerate(tree.parents))
    # the template (0,) (1,) (0,0) (0,1) (1,0) (0,0,0), ordered rank-0 chain first: (0,) (0,0)
    # (0,0,0) (1,) (0,1) (1,0), read from a hand-made M where rows 2 and 7 are known: the child of
    # 9 (never seen, a zero row) is dropped, not drafted as token 0
    assert d.paths == [(0,), (0, 0), (0, 0, 0), (1,), (0, 1), (1, 0)]
    d.adjacency[2], d.adjacency[7] = torch.tensor([7, 9, 11]), torch.tensor([2, 4, 5])
    d.known[:] = False
    d.known[[2, 7]] = True
    tree = d.propose([torch.tensor([1, 2])], 3)[0]
    assert (tree.tokens, tree.parents) == ([7, 2, 7, 9, 4], [-1, 0, 1, -1, 0])
    assert d.propose([torch.tensor([1, 2])], 1)[0].tokens == [7, 9]        # k bounds the depth
    d.observe(torch.tensor([[9, 2]]), torch.randn(1, 2, 50), [[0]], torch.tensor([[True, False]]))
    assert bool(d.known[9]) and d.adjacency[2].tolist() == [7, 9, 11]   # the padded position wrote nothing
    # Token Recycling's memory for a 49,152-token vocabulary stays under 2 MB
    assert TokenRecycling(49152, 8).nbytes < 2_000_000


def test_greedy_argmax_from_the_drafters_top_k_breaks_ties_as_argmax():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 3.0], [2.0, 0.0, 5.0, 1.0]]])
    top = logits.topk(2, dim=-1)
    assert greedy_argmax(logits, top).tolist() == [[1, 2]]
    # top-k may list tied tokens in any order: the tie goes to argmax's first index, not top-k's
    swapped = torch.return_types.topk((top.values, torch.tensor([[[3, 1], [2, 0]]])))
    assert greedy_argmax(logits, swapped).tolist() == logits.argmax(-1).tolist() == [[1, 2]]
    assert greedy_argmax(logits).tolist() == [[1, 2]]
    # a top-k of one column (a one-token vocabulary) cannot show a tie: argmax decides
    one = torch.return_types.topk((top.values[..., :1], torch.tensor([[[3], [2]]])))
    assert greedy_argmax(logits, one).tolist() == [[1, 2]]


def test_pass_is_registered_and_options_are_validated():
    info = tcompile.passes.available()["speculative"]
    assert info["family"] == "speculative" and {"drafter", "k", "acceptance"} <= set(info["options"])
    spec = PassSpec.make("speculative", drafter="prompt_lookup", k=8)
    assert str(spec) == "speculative" and parse_pipeline("speculative{drafter=token_recycling,k=4}")[0].options.k == 4
    for bad, match in [({"k": 0}, "k=0"), ({"k": -3}, "k=-3"), ({"drafter": "magic"}, "drafter"),
                       ({"acceptance": "loose"}, "acceptance"), ({"delta": 1.5}, "delta"),
                       ({"min_ngram": 3, "max_ngram": 2}, "min_ngram"), ({"drafter": "draft_model"}, "draft=")]:
        with pytest.raises(PassOptionError, match=match):
            PassSpec.make("speculative", **bad)


def test_runtime_needs_the_verify_graph(llama_program, llama):
    with pytest.raises(PassOptionError, match="verify=True"):
        runtime_for(llama_program, parse_pipeline("speculative"), llama)


def test_optimize_with_the_pass_reports_acceptance(llama, prompts):
    opt = tcompile.optimize(llama, passes="speculative{drafter=prompt_lookup,k=4}")
    ids, mask = prompts
    assert isinstance(opt.runtime, SpeculativeRuntime)
    out = opt.generate(ids, mask, max_new_tokens=16)
    assert out.shape == (3, 32)
    figures = opt.report.latency["speculative"]
    assert figures["drafter"] == "prompt_lookup" and 0 <= figures["acceptance_rate"] <= 1
    assert figures["mean_accepted_length"] >= 1 and figures["tokens_per_s"] > 0 and figures["lossy"] is False
    # the step's time split: verify call and drafter inside the step, the rest what remains
    assert figures["verify_ms"] > 0 and figures["draft_ms"] > 0 and figures["other_ms"] >= 0
    assert figures["step_ms"] == pytest.approx(figures["verify_ms"] + figures["draft_ms"] + figures["other_ms"])
    assert figures["verify_ms"] + figures["draft_ms"] <= figures["step_ms"]
    assert "ms per step (verify " in opt.report.summary()


def test_drafters_accept_on_repetitive_text(llama_spec, llama):
    """Random tiny models fall into loops; every drafter but a foreign draft model then accepts."""
    plain, _ = runtime_for(llama_spec, [])
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    want = plain.generate(ids, max_new_tokens=NEW)
    for drafter in ("prompt_lookup", "token_recycling", "layer_skip"):
        spec, _ = runtime_for(llama_spec, [PassSpec("speculative", _options(drafter, "llama"))], llama)
        spec.generate(ids, max_new_tokens=NEW)
        assert torch.equal(spec.generate(ids, max_new_tokens=NEW), want)
        assert spec.last_stats.accepted > 0 and spec.last_stats.mean_accepted_length > 1.0, drafter
    same, _ = runtime_for(llama_spec, [PassSpec("speculative", SpeculativeOptions(
        drafter="draft_model", draft=llama, fallback=0.0, k=4))], llama)
    assert torch.equal(same.generate(ids, max_new_tokens=NEW), want)
    assert same.last_stats.acceptance_rate == 1.0          # the target drafting for itself


def test_bild_fallback_stops_drafting_when_the_draft_is_unsure(llama_spec, llama):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    spec, _ = runtime_for(llama_spec, [PassSpec("speculative", SpeculativeOptions(
        drafter="draft_model", draft=llama, fallback=1.0, k=4))], llama)
    out = spec.generate(ids, max_new_tokens=16)
    assert spec.last_stats.drafted == 0 and torch.equal(out, runtime_for(llama_spec, [])[0].generate(ids, max_new_tokens=16))


def test_layer_skip_skips_layers_and_leaves_the_model_alone(llama_spec, llama):
    from tcompile.runtime.model_drafters import skip_layers
    spec, _ = runtime_for(llama_spec, [PassSpec("speculative", SpeculativeOptions(drafter="layer_skip"))], llama)
    assert spec.drafter.skip == (1,) and len(llama.model.layers) == 2      # chosen on calibration; model untouched
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(8))
    skipped = skip_layers(llama, (1,))
    with torch.no_grad():   # E6's test: the skipped forward equals a manual forward bypassing that layer
        h = llama.model.embed_tokens(ids)
        pos = torch.arange(10)[None]
        rope = llama.model.rotary_emb(h, pos)
        mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
        h = llama.model.layers[0](h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
        manual = llama.lm_head(llama.model.norm(h))
        assert torch.allclose(skipped(ids).logits, manual, atol=1e-5)
    with pytest.raises(PassOptionError, match="outside"):
        skip_layers(llama, (5,))


def test_a_draft_model_with_another_vocabulary_is_a_clear_error(llama_spec, llama):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(PassOptionError, match="vocabulary of 96 tokens, the target 128"):
        runtime_for(llama_spec, [PassSpec("speculative", SpeculativeOptions(drafter="draft_model", draft=other))], llama)
    with pytest.raises(PassOptionError, match="not a causal LM"):
        runtime_for(llama_spec, [PassSpec("speculative", SpeculativeOptions(drafter="draft_model", draft="gpt2"))], llama)


@pytest.mark.parametrize("kv", ["kv_streaming{tokens=8}", "kv_snapkv{tokens=8,window=3}", "kv_h2o{tokens=8}",
                                "kv_tova{tokens=8}"])
@pytest.mark.parametrize("drafter", ["prompt_lookup", "token_recycling"])
def test_composes_with_every_kv_eviction_pass(llama_spec, llama, prompts, kv, drafter):
    """Only accepted entries enter the budget: the cache holds `tokens` entries per KV head at
    every step, in capacity + T slots, whatever the drafts."""
    ids, mask = prompts
    spec, _ = runtime_for(llama_spec, parse_pipeline(f"{kv},speculative{{drafter={drafter},k=4}}"), llama)
    out = spec.generate(ids, mask, max_new_tokens=40)
    stats, cache = spec.last_stats, spec.last_cache
    assert out.shape == (3, 56) and stats.accepted > 0
    assert stats.peak_cache_entries == 8 and cache.entries == 8
    assert cache.slots <= 8 + 1 + 1 + 4 * 6      # budget + the largest draft's scratch (a tree of ≤ k·… nodes)
    live = cache.pos >= 0
    assert bool((live.sum(-1) == 8).all())       # every layer and KV head keeps exactly the budget
    assert bool((live == cache.valid[:, None, None, :]).all())


def test_streaming_keeps_sinks_and_the_latest_entries(llama_spec, llama, prompts):
    ids, mask = prompts
    spec, _ = runtime_for(llama_spec, parse_pipeline("kv_streaming{tokens=8,sinks=4},speculative{k=4}"), llama)
    spec.generate(ids, mask, max_new_tokens=40)
    cache = spec.last_cache
    for row in range(3):
        seen = int(cache.seen[row])
        for layer in range(cache.pos.shape[1]):
            for head in range(cache.pos.shape[2]):
                kept = sorted(p for p in cache.pos[row, layer, head].tolist() if p >= 0)
                assert kept == [0, 1, 2, 3] + list(range(seen - 4, seen)), (row, kept)


def test_kv_budget_never_reached_equals_plain_greedy(llama_spec, llama, prompts):
    ids, mask = prompts
    plain, _ = runtime_for(llama_spec, [])
    spec, _ = runtime_for(llama_spec, parse_pipeline("kv_h2o{tokens=16,decode=grow},speculative{k=4}"), llama)
    assert torch.equal(spec.generate(ids, mask, max_new_tokens=NEW), plain.generate(ids, mask, max_new_tokens=NEW))
