"""token_pruning as a graph rewrite: structure, float64 numerics, statistics, restrictions."""
from __future__ import annotations

import copy

import pytest
import torch

from tcompile.capture import capture
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassManager
from tcompile.passes.token_pruning import default_layers, evit_prune
from tcompile.registry import parse_pipeline
from vit_reference import ref_vit


def _run(program, text):
    return PassManager().run(program, parse_pipeline(text))


def test_structure_and_statistics(vit_program):
    out, (rec,) = _run(vit_program, "token_pruning{keep=0.5,layers=[1,2]}")
    assert [n.target for n in out.gm.graph.nodes].count(evit_prune) == 2
    assert rec.tokens_after == [65, 65, 33, 17]
    assert rec.stats["tokens_out"] == 17 and rec.fidelity is not None


@pytest.mark.parametrize("fuse", [False, True])
def test_numerics_match_float64_reference(vit_model, fuse):
    model64 = copy.deepcopy(vit_model).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out, (rec,) = _run(capture(model64, {"pixel_values": x[:2]}),
                       f"token_pruning{{keep=0.5,layers=[1,2],fuse={str(fuse).lower()}}}")
    # keep = ceil(0.5 * prunable): 32 of 64 at layer 1; at layer 2, 16 of 32 (17 of 33 when the
    # fused token from layer 1 is there: EViT treats it as an ordinary token)
    keeps = [0, 32, 17, 0] if fuse else [0, 32, 16, 0]
    got = out.gm(pixel_values=x).logits
    want = ref_vit(vit_model, x, keeps, method="evit", fuse=fuse, prop_attn=False)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_default_layers_follow_evit():
    assert default_layers(12) == (3, 6, 9)
    assert default_layers(4) == (1, 2, 3)


def test_per_token_outputs_need_fuse(bert_program):
    _, (rec,) = _run(bert_program, "token_pruning{keep=0.5}")
    assert rec.status == "skipped" and "fuse" in rec.reason
    out, (rec,) = _run(bert_program, "token_pruning{keep=0.5,fuse=true}")
    assert rec.status == "applied"


def test_mean_attention_score_without_cls(vit_program):
    out, (rec,) = _run(vit_program, "token_pruning{keep=0.5,layers=[1],protect=0}")
    assert rec.tokens_after == [65, 65, 33, 33]


def test_bad_options(vit_program):
    for text, match in [("token_pruning{keep=0}", r"\(0, 1\]"), ("token_pruning{keep=1.5}", r"\(0, 1\]"),
                        ("token_pruning{keep=[0.5,0.5],layers=[1]}", "one keep ratio")]:
        with pytest.raises(PassOptionError, match=match):
            parse_pipeline(text)
    with pytest.raises(PassOptionError, match="does not exist"):
        _run(vit_program, "token_pruning{layers=[9]}")
