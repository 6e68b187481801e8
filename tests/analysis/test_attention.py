"""Capture and attention-site analysis on both attention forms, and the no-attention error."""
from __future__ import annotations

import pytest
import torch

from tcompile.analysis.attention import analyze_attention, require_attention
from tcompile.capture import capture
from tcompile.errors import CaptureError, NoAttentionError
from tcompile.models.vision import tiny_bert, tiny_vit


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit_sites(impl, vit_inputs):
    prog = capture(tiny_vit(attn_implementation=impl), vit_inputs)
    a = analyze_attention(prog)
    assert len(a.sites) == 4 and a.leading_special == 1
    s = a.sites[0]
    assert (s.form, s.heads, s.kv_heads, s.head_dim, s.q_tokens) == (impl, 4, 4, 8, 65)
    assert s.pre_norm and s.residual is not None and s.block_input is not None
    assert prog.info["dynamic_batch"]
    if impl == "sdpa":  # transformers' all-True mask is folded away at capture
        assert s.mask is None and prog.info["trivial_masks_removed"] == 4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_sites_keep_padding_mask(impl, bert_inputs):
    prog = capture(tiny_bert(attn_implementation=impl), bert_inputs)
    a = analyze_attention(prog)
    assert len(a.sites) == 3 and a.leading_special == 1      # the pooler reads token 0
    assert all(not s.pre_norm and s.mask is not None for s in a.sites)
    assert prog.info["trivial_masks_removed"] == 0


def test_capture_matches_eager_and_serves_other_batches(vit_model, vit_program):
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(vit_program.gm(pixel_values=x).logits, vit_model(pixel_values=x).logits)


def test_capture_restores_training_flag():
    m = tiny_vit().train()
    capture(m, torch.randn(2, 3, 32, 32))
    assert m.training


def test_no_attention_names_what_was_found():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    prog = capture(mlp, (torch.randn(2, 8),))
    with pytest.raises(NoAttentionError, match="no attention site.*linear"):
        require_attention(prog)


def test_bad_example_inputs():
    with pytest.raises(CaptureError, match="not supported"):
        capture(tiny_vit(), 3.0)
    with pytest.raises(CaptureError, match="could not capture"):
        capture(tiny_vit(), {"pixel_values": torch.randn(2, 5, 32, 32)})
