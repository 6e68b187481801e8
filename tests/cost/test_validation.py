"""cost.validate: predicted vs measured latency per configuration, Spearman, errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tcompile.cost import DeviceProfile, cpu_profile
from tcompile.cost.validation import spearman, validate
from tcompile.models.lm import tiny_llama
from tcompile.runtime import capture_lm


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)    # ties share a rank
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1.0], [2.0])


def test_forward_configs_rank_merging_levels(vit_program):
    result = validate(vit_program, ["", "token_merging{r=8}", "token_merging{r=16}"], rounds=2)
    assert [r.pipeline for r in result.rows] == ["", "token_merging{r=8}", "token_merging{r=16}"]
    preds = [r.predicted_s for r in result.rows]
    assert all(p > 0 for p in preds) and len(set(preds)) == 3      # each priced on its own graph
    assert all(r.measured_s > 0 and len(r.times_s) == 2 for r in result.rows)
    assert -1.0 <= result.spearman <= 1.0 and result.median_abs_error >= 0
    assert "Spearman" in result.table() and result.to_dict()["rows"][0]["error"] == result.rows[0].error


@pytest.fixture(scope="module")
def llama():
    return capture_lm(tiny_llama())


def test_lm_prefill_prices_the_prompt_length_and_sparse_density(llama):
    dense = validate(llama, ["", "sparse_attention{density=0.2,block=16,min_tokens=16}"], phase="prefill",
                     tokens=256, rounds=1)
    # at 256 tokens the CPU path's ~500 small ops outweigh the pairs it skips: priced slower than dense
    assert dense.rows[1].predicted_s > dense.rows[0].predicted_s
    def at(n: int, config: str = "") -> float:
        return validate(llama, [config, config], phase="prefill", tokens=n, rounds=1).rows[0].predicted_s
    assert dense.rows[0].predicted_s == pytest.approx(at(256)) and at(256) > at(64)   # priced at the length
    assert at(256, "prompt_pruning{keep=64}") > at(64)               # the filter graph on 256 tokens + 64 kept


def test_lm_decode_prices_the_cache_the_policy_keeps(llama):
    result = validate(llama, ["kv_streaming{ratio=0.75}", "kv_streaming{ratio=0.25}"], phase="decode", tokens=512,
                      rounds=2)
    assert result.rows[1].predicted_s < result.rows[0].predicted_s


def test_lm_decode_prices_the_policys_bookkeeping(llama, monkeypatch):
    """A decode step is priced with the runtime's bookkeeping, and TOVA's (a ranking of every
    entry per step) costs more than the plain append of a full cache."""
    import tcompile.cost.validation as validation
    configs = ["", "kv_tova{ratio=0.9}"]
    with_book = [r.predicted_s for r in validate(llama, configs, phase="decode", tokens=512, rounds=1).rows]
    monkeypatch.setattr(validation, "book_cost", lambda *args: 0.0)
    graph_only = [r.predicted_s for r in validate(llama, configs, phase="decode", tokens=512, rounds=1).rows]
    full, tova = (a - b for a, b in zip(with_book, graph_only))
    assert 0 < full < tova


def elsewhere() -> DeviceProfile:
    """This CPU's profile as if measured on another machine: priced by the rules, never probed."""
    return dataclasses.replace(cpu_profile(), name="cpu: another machine (2 threads)")


def test_sparse_op_rule_scales_with_density(llama):
    configs = [f"sparse_attention{{density={d},block=16,min_tokens=16,last_q=16}}" for d in (0.1, 0.5, 1.0)]
    preds = [r.predicted_s for r in validate(llama, configs, phase="prefill", tokens=512, rounds=1,
                                             profile=elsewhere()).rows]
    assert preds[0] < preds[1] < preds[2]


def test_sparse_op_is_timed_on_this_hosts_profile(llama, monkeypatch):
    """On the profile measured here, the sparse op is priced by timing it (its probe: the op on
    random q/k/v of the node's shapes); elsewhere by its rule."""
    from tcompile.cost import model
    timed: list[object] = []

    def fake_time(probe, profile):
        timed.append(probe)
        return 0.5
    monkeypatch.setattr(model, "probe_seconds", fake_time)
    config = ["", "sparse_attention{density=0.3,block=16,min_tokens=16}"]
    here = validate(llama, config, phase="prefill", tokens=256, rounds=1).rows
    layers = llama.spec.num_layers
    assert len(timed) == layers and all(p.args[3] is None and p.args[0].shape[2] == 256 for p in timed)
    assert here[1].predicted_s > layers * 0.5 > here[0].predicted_s
    away = validate(llama, config, phase="prefill", tokens=256, rounds=1, profile=elsewhere()).rows
    assert len(timed) == layers and away[1].predicted_s < layers * 0.5


def test_bad_input(vit_program, llama):
    with pytest.raises(ValueError, match="at least two configurations"):
        validate(vit_program, [""])
    with pytest.raises(ValueError, match="phase='decode' does not fit"):
        validate(vit_program, ["", "token_merging{r=2}"], phase="decode")
    with pytest.raises(ValueError, match="phase='sideways' is unknown"):
        validate(llama, ["", ""], phase="sideways")


def test_sparse_op_rule_counts_the_cpu_path_dispatches():
    """On CPU the gathered path dispatches hundreds of small ops (the per-op overhead prices
    them); with the Triton kernels a few; a row below min_tokens runs dense (one SDPA)."""
    from tcompile.passes.sparse_attention import sparse_work
    flops, ops = sparse_work("v", 0.3, 64, 9, 1024, 64, on_cpu=True)
    dense, one = sparse_work("v", 0.3, 64, 9, 1024, 64, on_cpu=True, min_tokens=2048)
    assert ops > 500 and one == 1.0 and flops < dense
    assert sparse_work("v", 0.3, 64, 9, 1024, 64, on_cpu=False)[1] < ops
    assert sparse_work("v", 0.3, 64, 9, 4096, 64, on_cpu=True)[1] > ops      # more blocks, more ops


def test_paired_median_cancels_a_slow_spell():
    from tcompile.cost.validation import paired_median
    ref = [1.0, 1.0, 2.0, 2.0, 2.0]          # the machine halves its speed after two rounds
    other = [0.8, 0.8, 1.6, 1.6, 1.6]        # always 0.8x the reference within a round
    assert paired_median(ref, ref) == 2.0
    assert paired_median(other, ref) == pytest.approx(1.6)
    assert paired_median([0.5, 0.5, 4.0, 4.0, 4.0], ref) > paired_median(other, ref)
