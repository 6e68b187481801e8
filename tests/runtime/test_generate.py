"""The prefill/decode runtime against transformers' own generate, and its input checks."""
from __future__ import annotations

import pytest
import torch

import tcompile
from tcompile.errors import CaptureError
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import runtime_for


def _hf(model, ids, mask, n):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_greedy_equals_transformers_batch_1_and_3(which, request, prompts):
    model, program = request.getfixturevalue(which), request.getfixturevalue(f"{which}_program")
    runtime, _ = runtime_for(program, [])
    ids, mask = prompts
    got = runtime.generate(ids, mask, max_new_tokens=12)
    assert got.shape == (3, 28)
    assert torch.equal(got, _hf(model, ids, mask, 12))
    one = runtime.generate(ids[2:, 6:], max_new_tokens=12)      # batch 1, no padding
    assert torch.equal(one, _hf(model, ids[2:, 6:], None, 12))
    assert torch.equal(one[0, 10:], got[2, 16:])                 # padding does not change a row


def test_cache_grows_by_one_entry_per_step_without_a_policy(llama_program, prompts):
    from tcompile.runtime.generate import GROW_SLOTS
    runtime, _ = runtime_for(llama_program, [])
    ids, mask = prompts
    runtime.generate(ids, mask, max_new_tokens=5)
    stats = runtime.last_stats
    assert stats.cache_entries_after_prefill == 16 and stats.peak_cache_entries == 16 + 4
    assert stats.full_cache_bytes == llama_program.spec.cache_bytes(3, 20)
    assert stats.peak_cache_bytes == llama_program.spec.cache_bytes(3, 16 + GROW_SLOTS)   # slots allocated at once
    runtime.generate(ids, mask, max_new_tokens=GROW_SLOTS + 3)                      # grows a second time
    assert runtime.last_stats.peak_cache_bytes == llama_program.spec.cache_bytes(3, 16 + 2 * GROW_SLOTS)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_program, prompts):
    runtime, _ = runtime_for(llama_program, [])
    ids, mask = prompts
    a = runtime.generate(ids, mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9,
                         generator=torch.Generator().manual_seed(3))
    b = runtime.generate(ids, mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and int(a.max()) < 128
    greedy = runtime.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(runtime.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=1), greedy)


def test_stops_at_eos_and_pads_finished_rows(llama_program, prompts):
    runtime, _ = runtime_for(llama_program, [])
    ids, mask = prompts
    free = runtime.generate(ids, mask, max_new_tokens=6)
    eos = int(free[0, 17])                                       # row 0's second new token
    out = runtime.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 16:]
    assert int(row0[1]) == eos and bool((row0[2:] == 0).all())


def test_optimize_routes_causal_lms_to_the_runtime(llama, prompts):
    opt = tcompile.optimize(llama, passes="kv_streaming{tokens=8}")
    ids, mask = prompts
    assert opt.generate(ids, mask, max_new_tokens=4).shape == (3, 20)
    assert opt.pipeline == "kv_streaming{tokens=8}"
    assert opt(ids, mask).shape == (3, 128)


def test_bad_input_gives_clear_errors(llama_program, prompts, llama):
    runtime, _ = runtime_for(llama_program, [])
    ids, mask = prompts
    with pytest.raises(ValueError, match="max_new_tokens"):
        runtime.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runtime.generate(ids + 200, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding"):
        runtime.generate(ids, mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        runtime.generate(ids, mask, max_new_tokens=600)
    with pytest.raises(TypeError, match="integer tensor"):
        runtime.generate(ids.float(), mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        runtime.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)


def test_encoder_is_not_a_causal_lm():
    from tcompile.models.vision import tiny_bert
    with pytest.raises(CaptureError, match="not a causal LM"):
        capture_lm(tiny_bert())


def test_kv_cache_budget_plans_among_policies(llama):
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(2))
    opt = tcompile.optimize(llama, budget="kv_cache=0.5", calibration=[ids])
    names = [c.pipeline for c in opt.report.candidates]
    assert len(names) == 5 and sum(c.chosen for c in opt.report.candidates) == 1
    chosen = next(c for c in opt.report.candidates if c.chosen)
    assert opt.pipeline == chosen.pipeline and "ratio=0.5" in opt.pipeline
    assert all(c.fidelity is None or 0.0 <= c.fidelity <= 1.0 + 1e-6 for c in opt.report.candidates)
    parts = opt.report.latency["parts"]                 # predicted vs measured prefill and decode step
    assert [p["part"].split(" ")[0] for p in parts] == ["prefill", "decode"]
    assert all(p["predicted_s"] > 0 and p["measured_s"] > 0 for p in parts)
    with pytest.raises(tcompile.TCompileError, match="calibration"):
        tcompile.optimize(llama, budget="kv_cache=0.5")


@pytest.mark.parametrize("budget, calibration, message", [
    ("kv_cache=0.5", [], "calibration is empty"),
    ("kv_cache=0.5", [torch.randn(3, 4)], r"calibration\[0\] must be the token ids"),
    ("kv_cache=0.5", [torch.arange(10)], r"calibration\[0\] has 10 tokens"),
    ("flops=0.5", None, r"\[.flops.\] are not planned for causal LMs"),
])
def test_lm_budget_and_calibration_errors(llama, budget, calibration, message):
    with pytest.raises((tcompile.TCompileError, ValueError), match=message):
        tcompile.optimize(llama, budget=budget, calibration=calibration)


def test_kv_pass_on_an_encoder_is_an_error():
    from tcompile.models.vision import tiny_bert
    inputs = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(tcompile.PassOptionError, match="not a causal LM"):
        tcompile.optimize(tiny_bert(), passes="kv_snapkv{ratio=0.5}", example_inputs=inputs)


def test_sdpa_gets_unrepeated_kv_with_native_gqa(llama_program):
    """transformers repeats K/V to every query head when a mask is given; capture undoes that copy."""
    for program in (llama_program.prefill, llama_program.decode):
        sdpa = [n for n in program.gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
        assert len(sdpa) == 2 and program.info["native_gqa_sites"] == 2
        for node in sdpa:
            assert node.kwargs.get("enable_gqa") is True
            assert node.args[1].meta["val"].shape[1] == 2          # kv_heads, not the 4 query heads


def test_decode_writes_the_cache_in_place_and_the_export_graph_stays_functional(llama_program, prompts):
    """A decode step must not copy the cache (the cost that made eviction slower than a full cache)."""
    runtime, _ = runtime_for(llama_program, [])
    ids, mask = prompts
    with torch.no_grad():
        logits, cache = runtime._prefill(ids, mask, None)
        buffers = [t.data_ptr() for t in cache.kv]
        before = [t.clone() for t in cache.kv]
        runtime._decode(logits.argmax(-1), cache, None)
    assert [t.data_ptr() for t in cache.kv] == buffers
    written = cache.slot[:, 0, 0] - 1                        # the step wrote at the slot before the next one
    assert not torch.equal(cache.kv[0][torch.arange(3), :, written], before[0][torch.arange(3), :, written])
    targets = {str(n.target) for n in runtime.decode_graph.graph.nodes}
    assert "aten.scatter.src" in targets and "aten.scatter_.src" not in targets


def test_inductor_backend_decodes_the_same_tokens(llama, prompts):
    """backend='inductor' compiles the decode step (dynamic shapes): greedy tokens stay identical."""
    ids, mask = prompts
    eager = tcompile.optimize(llama, passes="kv_tova{tokens=8}")
    compiled = tcompile.optimize(llama, passes="kv_tova{tokens=8}", backend="inductor")
    assert compiled.backend == "inductor"
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=10), eager.generate(ids, mask, max_new_tokens=10))
    with pytest.raises(tcompile.BackendUnavailableError, match="inductor"):
        tcompile.optimize(llama, backend="tensorrt")


def test_inductor_backend_compiles_the_verify_step_frozen(llama, prompts):
    """A speculative runtime on inductor compiles its verify step too, with freezing (on a CPU
    the linear weights are packed for oneDNN, the point of freezing) and the step settings
    (``STEP_SETTINGS``: serial kernels, a C++ wrapper, q/k/v and gate/up each one GEMM): greedy
    tokens still equal plain eager greedy."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    ids, mask = prompts
    want = tcompile.optimize(llama, passes=[]).generate(ids, mask, max_new_tokens=16)
    counters.clear()
    spec = tcompile.optimize(llama, passes="speculative{drafter=prompt_lookup,k=4}", backend="inductor")
    got, code = run_and_get_code(spec.generate, ids, mask, max_new_tokens=16)   # compiles both steps
    assert torch.equal(got, want)
    assert spec.last_stats.steps < 15            # it did verify several tokens per step
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0
    assert len(code) == 2 and all("inductor_entry_impl" in c for c in code)    # C++ wrappers
    assert not any("#pragma omp parallel" in c for c in code)                  # serial kernels
    # 7 linears a layer and the LM head; q/k/v become one GEMM and gate/up one: 4 a layer
    calls = [c.count("aoti_torch_cpu__linear_pointwise") + c.count("aoti_torch_cpu__mkl_linear") for c in code]
    assert calls == [4 * llama.config.num_hidden_layers + 1] * 2
