"""token_merging as a graph rewrite: structure, float64 numerics, statistics, exportability."""
from __future__ import annotations

import copy

import pytest
import torch

from tcompile.analysis.graph_utils import aten
from tcompile.capture import capture
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassManager
from tcompile.passes.merge_ops import pitome_margin, pitome_merge, tome_merge
from tcompile.passes.token_state import size_bias, unmerge
from tcompile.registry import parse_pipeline
from vit_reference import ref_vit


def _run(program, text, verify=True):
    return PassManager(verify=verify).run(program, parse_pipeline(text))


def _targets(program):
    return [n.target for n in program.gm.graph.nodes if n.op == "call_function"]


def test_structure_and_statistics(vit_program):
    out, (rec,) = _run(vit_program, "token_merging{r=6}")
    targets = _targets(out)
    assert targets.count(tome_merge) == 4                  # one merge per block
    assert targets.count(size_bias) == 3                   # proportional attention after the first merge
    assert rec.status == "applied" and rec.stats["tokens_out"] == 65 - 24
    assert rec.tokens_before == [65] * 4 and rec.tokens_after == [65, 59, 53, 47]
    assert rec.flops_after < rec.flops_before
    assert 0.9 < rec.fidelity <= 1.0 + 1e-9
    # the original program is untouched
    assert tome_merge not in _targets(vit_program)


@pytest.mark.parametrize("method,metric", [("tome", "keys"), ("pitome", "keys"), ("tome", "hidden"),
                                           ("pitome", "hidden")])
def test_numerics_match_float64_reference(vit_model, method, metric):
    model64 = copy.deepcopy(vit_model).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    prog = capture(model64, {"pixel_values": x[:2]})
    out, _ = _run(prog, f"token_merging{{r=5,method={method},metric={metric}}}")
    got = out.gm(pixel_values=x).logits                    # batch 3: not the captured batch
    margins = [pitome_margin(i, 4) for i in range(4)]
    want = ref_vit(vit_model, x, [5, 5, 5, 5], method=method, margins=margins, metric=metric)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ratio_and_decreasing_schedules(vit_program):
    out, (rec,) = _run(vit_program, "token_merging{ratio=0.25}")
    assert rec.tokens_after == [65, 49, 37, 28]
    out, (rec,) = _run(vit_program, "token_merging{r=4,schedule=decreasing}")
    assert [a - b for a, b in zip(rec.tokens_after, rec.tokens_after[1:])] == [8, 5, 3]
    out, (rec,) = _run(vit_program, "token_merging{layers=[0,10]}")
    assert rec.tokens_after == [65, 65, 55, 55]


def test_r_capped_at_half_per_layer_as_tome(vit_program):
    out, (rec,) = _run(vit_program, "token_merging{r=32}")
    assert rec.tokens_after == [65, 33, 17, 9]


def test_r_beyond_first_layer_raises(vit_program):
    with pytest.raises(PassOptionError, match="at most 32 can merge"):
        _run(vit_program, "token_merging{r=40}")


def test_cls_token_is_protected(vit_program, vit_inputs):
    out, (rec,) = _run(vit_program, "token_merging{r=8}")
    assert rec.stats["protected"] == 1
    assert [n.args[5] for n in out.gm.graph.nodes if n.target is tome_merge] == [1] * 4
    out0, _ = _run(vit_program, "token_merging{r=8,protect=0}")
    assert [n.args[5] for n in out0.gm.graph.nodes if n.target is tome_merge] == [0] * 4


def test_per_token_outputs_unmerged_for_bert(bert_program, bert_model, bert_inputs):
    out, (rec,) = _run(bert_program, "token_merging{r=3}")
    assert unmerge in _targets(out)
    y = out.gm(**bert_inputs)
    assert y.last_hidden_state.shape == (2, 24, 32)
    assert rec.stats["output_mode"] == "unmerge"
    merged, (rec2,) = _run(bert_program, "token_merging{r=3,output=merged}")
    assert merged.gm(**bert_inputs).last_hidden_state.shape == (2, 24 - 9, 32)


def test_padding_only_merges_pads_exactly(bert_program, bert_model, bert_inputs):
    """Row 1 has 10 pads; merging 2 tokens after layer 0 takes pads only, so its real tokens
    must equal the unoptimized model's (up to float32 noise)."""
    out, (rec,) = _run(bert_program, "token_merging{layers=[2],prop_attn=false}")
    from tcompile.fidelity import output_cosine
    kw = bert_program.example_kwargs       # the recorded fidelity leaves padding positions out
    masked = output_cosine(bert_program.run(), out.run(), token_mask=kw["attention_mask"])
    assert rec.fidelity == pytest.approx(masked, abs=1e-9) and masked > output_cosine(bert_program.run(), out.run())
    got = out.gm(**bert_inputs).last_hidden_state
    want = bert_model(**bert_inputs).last_hidden_state
    torch.testing.assert_close(got[1, :14], want[1, :14], rtol=1e-4, atol=1e-5)


def test_eager_attention_form(vit_inputs):
    from tcompile.models.vision import tiny_vit
    prog = capture(tiny_vit(attn_implementation="eager"), vit_inputs)
    out, (rec,) = _run(prog, "token_merging{r=6}")
    assert rec.status == "applied" and rec.tokens_after == [65, 59, 53, 47]
    assert aten.scaled_dot_product_attention.default not in _targets(out)


def test_exported_graph_uses_only_exportable_ops(vit_program):
    out, _ = _run(vit_program, "token_merging{r=6,method=pitome}")
    ep = torch.export.export(out.gm, (), {"pixel_values": torch.randn(2, 3, 32, 32)}, strict=False)
    ops = {str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function"}
    assert any("scatter_add" in o for o in ops) and any("gather" in o for o in ops)
    assert not any("scatter_reduce" in o for o in ops)
    assert not any("nonzero" in o or "masked_select" in o for o in ops)


def test_bad_options():
    for text, match in [("token_merging{r=-1}", "non-negative"), ("token_merging{ratio=0.7}", r"\[0, 0.5\]"),
                        ("token_merging{method=foo}", "method"), ("token_merging{metric=values}", "metric"), ("token_merging{r=4,ratio=0.1}", "only one"),
                        ("token_merging{rr=4}", "no option")]:
        with pytest.raises(PassOptionError, match=match):
            parse_pipeline(text)


def test_exported_math_functions_are_the_ones_inserted():
    assert {tome_merge, pitome_merge} <= set(__import__("tcompile.passes.token_reduction",
                                                         fromlist=["x"]).REDUCER_FUNCTIONS)
