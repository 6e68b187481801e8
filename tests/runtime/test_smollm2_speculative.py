"""Speculative decoding on the real SmolLM2-135M-Instruct: greedy output equals plain greedy,
token for token, for every drafter, 128 new tokens, batch 1 and batch 2 (acceptance 1)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

NEW = 128


@pytest.fixture(scope="module")
def smollm2():
    from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
    from tcompile.runtime import capture_lm
    model = load_smollm2()
    return model, load_smollm2_tokenizer(), capture_lm(model, "SmolLM2-135M-Instruct", verify=True)


@pytest.fixture(scope="module")
def plain(smollm2):
    """The prompts and plain greedy's output, computed once for every drafter."""
    from tcompile.runtime.lm_optimize import runtime_for
    _, tok, program = smollm2
    ids, mask = _chat(tok, ["Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
                            "Write a short poem about the sea."])
    runtime, _ = runtime_for(program, [])
    return ids, mask, runtime.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])


def _chat(tok, questions):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _options(drafter, model):
    from tcompile.passes.speculative import SpeculativeOptions
    from tcompile.runtime.model_drafters import skip_layers
    # Exactness does not depend on how good the draft is; small drafts keep this test's capture and
    # drafting cheap (CI time): no smaller SmolLM2 ships offline, so a 4-layer copy stands in.
    if drafter == "draft_model":
        return SpeculativeOptions(drafter="draft_model", k=4, fallback=0.3, draft=skip_layers(model, tuple(range(2, 28))))
    if drafter == "layer_skip":
        return SpeculativeOptions(drafter="layer_skip", k=4, skip=tuple(range(1, 29, 2)), fallback=0.3)
    return SpeculativeOptions(drafter=drafter, k=8)


@pytest.mark.parametrize("drafter", ["prompt_lookup", "token_recycling", "draft_model", "layer_skip"])
def test_smollm2_speculative_greedy_equals_plain_greedy(smollm2, plain, drafter):
    from tcompile.registry import PassSpec
    from tcompile.runtime.lm_optimize import runtime_for
    model, _, program = smollm2
    ids, mask, want = plain
    spec, _ = runtime_for(program, [PassSpec("speculative", _options(drafter, model))], model)
    got = spec.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got, want)
    if drafter == "draft_model":    # the stand-in draft (26 of 30 layers removed) drafts but is rarely right
        assert spec.last_stats.drafted > 0
    else:
        assert spec.last_stats.accepted > 0 and spec.last_stats.mean_accepted_length > 1.0
    one = spec.generate(ids[:1], mask[:1], max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(one, want[:1])
