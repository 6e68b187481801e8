"""GemFilter prompt pruning: filter scores against float64, pass 2 against transformers, errors."""
from __future__ import annotations

import pytest
import torch

import tcompile
from tcompile.errors import PassOptionError
from tcompile.registry import parse_pipeline
from tcompile.runtime.lm_optimize import runtime_for


def _reference_scores(model, ids, layer):
    """float64: Σ_h q_h(last token)·k_kv(h),j at ``layer``, from transformers' own modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    m = model.model
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        block = m.layers[layer]
        h = block.input_layernorm(hidden)
        b, n, _ = h.shape
        cfg = model.config
        d = cfg.hidden_size // cfg.num_attention_heads
        q = block.self_attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
        k = block.self_attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
        cos, sin = m.rotary_emb(h, torch.arange(n)[None].expand(b, -1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    g = q.shape[1] // k.shape[1]
    out = torch.zeros(b, n, dtype=torch.float64)
    for head in range(q.shape[1]):
        out += q[:, head, -1].double()[:, None, :].mul(k[:, head // g].double()).sum(-1)
    return out


@pytest.mark.parametrize("layer", [0, 1])
def test_filter_scores_match_float64(llama, llama_program, layer):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    runtime, records = runtime_for(llama_program, parse_pipeline(f"prompt_pruning{{layer={layer},keep=8}}"))
    got = runtime.prompt_filter.fn(ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(got.double(), _reference_scores(llama, ids, layer), rtol=1e-4, atol=1e-4)
    assert any(r.stats.get("filter_layer") == layer for r in records)
    from tcompile.analysis.graph_utils import SDPA_OPS
    sites = [n for n in runtime.prompt_filter.fn.graph.nodes if n.target in SDPA_OPS]
    assert len(sites) == layer                     # the filter stops at layer r's scores: nothing after them
    assert not any("lm_head" in str(n.target) for n in runtime.prompt_filter.fn.graph.nodes)


def test_pruned_generation_equals_transformers_on_the_kept_tokens(llama, llama_program, prompts):
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline("prompt_pruning{layer=1,keep=8,tail=2}"))
    kept_ids, kept_mask, kept = runtime.prompt_filter(ids, mask)
    assert kept_ids.shape == (3, 8) and bool((kept[:, -2:] == 15).any(dim=1).all())   # the tail is kept
    assert bool((kept >= 0).all()) and bool((kept.diff(dim=1) > 0).all())             # original order
    got = runtime.generate(ids, mask, max_new_tokens=10)
    want = llama.generate(kept_ids, attention_mask=kept_mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, 16:], want[:, 8:])
    assert runtime.last_stats.prompt_tokens_kept == 8


def test_short_prompts_are_not_pruned(llama_program, prompts):
    ids, mask = prompts
    plain, _ = runtime_for(llama_program, [])
    pruned, _ = runtime_for(llama_program, parse_pipeline("prompt_pruning{keep=16}"))
    assert torch.equal(pruned.generate(ids, mask, max_new_tokens=6), plain.generate(ids, mask, max_new_tokens=6))


def test_prompt_pruning_composes_with_kv_eviction_and_round_trips(llama, prompts, tmp_path):
    ids, mask = prompts
    opt = tcompile.optimize(llama, passes="prompt_pruning{keep=10,layer=0},kv_streaming{tokens=6,sinks=2}")
    want = opt.generate(ids, mask, max_new_tokens=8)
    assert opt.last_stats.prompt_tokens_kept == 10 and opt.last_stats.capacity == 6
    loaded = tcompile.load(opt.export(tmp_path / "lm"))
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=8), want)


def test_prompt_pruning_errors(llama):
    with pytest.raises(PassOptionError, match="FastV"):
        parse_pipeline("prompt_pruning{method=fastv}")
    with pytest.raises(PassOptionError, match="tail"):
        parse_pipeline("prompt_pruning{keep=4,tail=5}")
    with pytest.raises(PassOptionError, match="kernel"):
        parse_pipeline("prompt_pruning{kernel=4}")
    with pytest.raises(PassOptionError, match="layers"):
        tcompile.optimize(llama, passes="prompt_pruning{layer=7}")
