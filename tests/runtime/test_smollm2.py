"""The real SmolLM2-135M-Instruct through the runtime: token-for-token equal to transformers, a
needle found with a quarter of the cache, and speculative decoding with the model-free drafters
equal to plain greedy (128 new tokens, batch 1 and 2; model drafters: test_smollm2_speculative.py)."""
from __future__ import annotations

import pytest
import torch

from smollm2_helpers import chat, check_speculative_equals_plain

pytestmark = pytest.mark.slow


def test_smollm2_greedy_equals_transformers_batch_1_and_3(smollm2):
    from tcompile.runtime.lm_optimize import runtime_for
    model, tok, program = smollm2
    opt, _ = runtime_for(program, [])
    ids, mask = chat(tok, ["What is the capital of France?", "Name three colours of the rainbow, please.",
                            "Write a haiku about compilers that make models faster."])
    assert len(set(mask.sum(1).tolist())) == 3                       # three prompt lengths
    got = opt.generate(ids, mask, max_new_tokens=20)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want[:, :got.shape[1]]) and got.shape[1] == want.shape[1]
    one_ids, _ = chat(tok, ["What is the capital of France?"])
    one = opt.generate(one_ids, max_new_tokens=12)
    assert torch.equal(one, model.generate(one_ids, max_new_tokens=12, do_sample=False))
    assert "Paris" in tok.decode(one[0, one_ids.shape[1]:])


def test_smollm2_finds_the_needle_with_a_quarter_of_the_cache(smollm2):
    """SnapKV with a forward max-pool at a 25% budget answers a ~1k-token needle question
    (bench/RESULTS.md §5: 6/6), with a cache of at most 27% of the full one's bytes."""
    from tcompile.models.needle import NEEDLE_CASES, needle_found, needle_prompt_ids
    from tcompile.registry import parse_pipeline
    from tcompile.runtime.lm_optimize import runtime_for
    _, tok, program = smollm2
    runtime, _ = runtime_for(program, parse_pipeline("kv_snapkv{ratio=0.25,pool=max,kernel=15,spread=forward}"))
    depth, magic = NEEDLE_CASES[2]
    ids = torch.tensor([needle_prompt_ids(tok, 1024, depth, magic)])
    out = runtime.generate(ids, max_new_tokens=24)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert needle_found(answer, magic), answer
    s = runtime.last_stats
    assert s.peak_cache_bytes / s.full_cache_bytes <= 0.27


@pytest.mark.parametrize("drafter", ["prompt_lookup", "token_recycling"])
def test_smollm2_model_free_drafters_equal_plain_greedy(smollm2, smollm2_plain, drafter):
    from tcompile.passes.speculative import SpeculativeOptions
    check_speculative_equals_plain(smollm2, smollm2_plain, SpeculativeOptions(drafter=drafter, k=8))

