"""Causal-LM backends ``aot`` and ``onnxruntime``: prefill and decode run as engines, the runtime
drives them; greedy tokens equal eager's, and artifacts round-trip with their engine files."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import tcompile
from tcompile.errors import ArtifactError, BackendUnavailableError

PIPE = "kv_h2o{tokens=8}"   # eviction adds score outputs to both steps: the engines must carry them


@pytest.fixture(scope="module")
def eager(llama):
    return tcompile.optimize(llama, passes=PIPE)


@pytest.fixture(scope="module", params=["onnxruntime", "aot"])
def lowered(request, llama):
    if request.param == "onnxruntime":
        pytest.importorskip("onnxruntime")
    return tcompile.optimize(llama, passes=PIPE, backend=request.param)


def test_greedy_tokens_equal_eager(lowered, eager, prompts) -> None:
    ids, mask = prompts
    want = eager.generate(ids, mask, max_new_tokens=12)
    got = lowered.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, want)
    assert lowered.last_stats.peak_cache_entries == 8
    with torch.no_grad():   # the prefill logits themselves
        assert (lowered(ids, mask) - eager(ids, mask)).abs().max().item() <= 1e-4


def test_artifact_round_trip(lowered, prompts, tmp_path) -> None:
    ids, mask = prompts
    path = lowered.export(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    engines = {"aot": ["lm_prefill.pt2", "lm_decode.pt2"], "onnxruntime": ["lm_prefill.onnx", "lm_decode.onnx"]}
    assert set(engines[lowered.backend]) <= set(manifest["files"]) and manifest["backend"] == lowered.backend
    loaded = tcompile.load(path)
    assert loaded.backend == lowered.backend
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=10), lowered.generate(ids, mask, max_new_tokens=10))
    decode = path / engines[lowered.backend][1]
    data = bytearray(decode.read_bytes())
    data[len(data) // 2] ^= 0xFF
    decode.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified after export"):
        tcompile.load(path)


@pytest.mark.parametrize("backend", ["onnxruntime", "aot"])
def test_no_pass_decode_with_growing_cache(llama, prompts, backend) -> None:
    """Without eviction the cache grows past the export's slots (add_slots) and the runtime hands
    the engine a stride-0 ``slot``: dynamic slots in the engine, inputs made contiguous for aot."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    ids, mask = prompts
    want = tcompile.optimize(llama, passes=[]).generate(ids, mask, max_new_tokens=70)
    got = tcompile.optimize(llama, passes=[], backend=backend).generate(ids, mask, max_new_tokens=70)
    assert torch.equal(got, want)


def test_onnxruntime_io_binding_decodes_the_same_tokens(llama, eager, prompts) -> None:
    """On a CPU the decode step runs unbound by default (binding the cache did not pay
    consistently there); the IO-binding path, the default on an accelerator, gives the same
    tokens when forced, alternating its two output buffers per cache tensor across steps."""
    pytest.importorskip("onnxruntime")
    from tcompile.runtime.lm_lowering import attach_engines
    ids, mask = prompts
    opt = tcompile.optimize(llama, passes=PIPE, backend="onnxruntime")
    on_cpu = opt.runtime.decode_fn.session.get_providers()[0] == "CPUExecutionProvider"
    assert (opt.runtime.decode_fn.alias is None) == on_cpu   # bound by default only off the CPU
    attach_engines(opt.runtime, "onnxruntime", opt.engines[0], io_binding=True)
    assert opt.runtime.decode_fn.alias
    got = opt.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, eager.generate(ids, mask, max_new_tokens=12))
    assert len(opt.runtime.decode_fn._buffers) == len(opt.runtime.decode_fn.alias)


def test_tensorrt_is_refused_for_lms(llama) -> None:
    with pytest.raises(BackendUnavailableError, match="not available for causal LMs"):
        tcompile.optimize(llama, passes=[], backend="tensorrt")


CHAIN, TREE = "speculative{drafter=prompt_lookup,k=4}", PIPE + ",speculative{drafter=token_recycling}"


@pytest.mark.parametrize("backend,pipe", [("onnxruntime", CHAIN), ("onnxruntime", TREE), ("aot", TREE)])
def test_speculative_verify_engine(llama, prompts, backend, pipe, tmp_path) -> None:
    """The verify step runs as an engine with a dynamic draft length: a chain draft (prompt
    lookup) gives plain greedy's tokens, a tree draft with H2O eviction (the engine carries the
    score outputs) the tokens of the same pipeline on eager (eviction timing differs from plain
    decoding's), batch 3 with padding; the artifact round-trips and refuses to load without its
    verify engine; onnxruntime also through IO binding. (aot: the tree case only, its compiles
    are slow.)"""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from tcompile.runtime.lm_lowering import OrtStep, engine_files
    ids, mask = prompts
    want = tcompile.optimize(llama, passes=pipe).generate(ids, mask, max_new_tokens=40)
    if pipe == CHAIN:
        assert torch.equal(want, tcompile.optimize(llama, passes=[]).generate(ids, mask, max_new_tokens=40))
    opt = tcompile.optimize(llama, passes=pipe, backend=backend)
    names = list(engine_files(opt.runtime, backend).values())
    assert opt.engines[1] == names and len(names) == 3
    if backend == "onnxruntime":
        assert isinstance(opt.runtime.verify_fn, OrtStep)
    cold = copy.deepcopy(opt.runtime.drafter)   # token_recycling's matrix learns across calls
    assert torch.equal(opt.generate(ids, mask, max_new_tokens=40), want)
    stats = opt.last_stats
    assert stats.steps < 39 and stats.accepted > 0   # several tokens per verify call
    if backend == "onnxruntime":   # bound (the default on an accelerator): the same tokens
        from tcompile.runtime.lm_lowering import attach_engines
        attach_engines(opt.runtime, backend, opt.engines[0], io_binding=True)
        # with eviction the tokens depend on how many a step accepts, so draft from the same matrix
        opt.runtime.drafter = cold
        assert opt.runtime.verify_fn.alias
        assert torch.equal(opt.generate(ids, mask, max_new_tokens=40), want)
    path = opt.export(tmp_path / "art")
    assert names[2] in json.loads((path / "manifest.json").read_text())["files"]
    assert torch.equal(tcompile.load(path).generate(ids, mask, max_new_tokens=40), want)
    (path / names[2]).unlink()
    with pytest.raises(ArtifactError, match="lm_verify"):
        tcompile.load(path)
