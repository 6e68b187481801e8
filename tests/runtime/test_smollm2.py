"""The real SmolLM2-135M-Instruct through the runtime: token-for-token equal to transformers."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
    return load_smollm2(), load_smollm2_tokenizer()


def _chat(tok, questions):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_smollm2_greedy_equals_transformers_batch_1_and_3(smollm2):
    import tcompile
    model, tok = smollm2
    opt = tcompile.optimize(model, passes=[])
    ids, mask = _chat(tok, ["What is the capital of France?", "Name three colours of the rainbow, please.",
                            "Write a haiku about compilers that make models faster."])
    assert len(set(mask.sum(1).tolist())) == 3                       # three prompt lengths
    got = opt.generate(ids, mask, max_new_tokens=20)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want[:, :got.shape[1]]) and got.shape[1] == want.shape[1]
    one_ids, _ = _chat(tok, ["What is the capital of France?"])
    one = opt.generate(one_ids, max_new_tokens=12)
    assert torch.equal(one, model.generate(one_ids, max_new_tokens=12, do_sample=False))
    assert "Paris" in tok.decode(one[0, one_ids.shape[1]:])
