"""What the real-SmolLM2 test modules share: chat prompts and the speculative exactness check.

The SmolLM2 tests are split over two modules (test_smollm2.py: the runtime and the model-free
drafters; test_smollm2_speculative.py: the model drafters) so that `pytest -n 2 --dist loadfile`
runs them on both workers at once; each worker captures the model once (``smollm2`` in conftest).
"""
from __future__ import annotations

import torch

NEW = 128   # issue 4, acceptance 1: 128 new tokens, batch 1 and batch 2, every drafter


def chat(tok, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``questions`` as SmolLM2 chat prompts, left padded: (input_ids, attention_mask)."""
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def plain_greedy(smollm2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts (a repetitive one, an open one) and plain greedy's NEW tokens after them."""
    from tcompile.runtime.lm_optimize import runtime_for
    _, tok, program = smollm2
    ids, mask = chat(tok, ["Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
                           "Write a short poem about the sea."])
    runtime, _ = runtime_for(program, [])
    return ids, mask, runtime.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])


def check_speculative_equals_plain(smollm2, plain, options) -> None:
    """Greedy speculative decoding with ``options`` gives plain greedy's tokens at batch 2 and 1."""
    from tcompile.registry import PassSpec
    from tcompile.runtime.lm_optimize import runtime_for
    model, _, program = smollm2
    ids, mask, want = plain
    spec, _ = runtime_for(program, [PassSpec("speculative", options)], model)
    got = spec.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(got, want)
    if options.drafter in ("draft_model", "layer_skip"):   # a 4-layer draft drafts but is rarely right
        assert spec.last_stats.drafted > 0
    else:
        assert spec.last_stats.accepted > 0 and spec.last_stats.mean_accepted_length > 1.0
    one = spec.generate(ids[:1], mask[:1], max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(one, want[:1])
