"""The evicting decode step in ONNX Runtime matches the eager runtime for 16 steps."""
from __future__ import annotations

import pytest
import torch

from tcompile.registry import parse_pipeline
from tcompile.runtime.lm_optimize import runtime_for

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("pipeline", ["kv_h2o{tokens=8}", "kv_snapkv{tokens=8,window=3}", "kv_streaming{tokens=8}"])
def test_onnx_decode_with_eviction_matches_eager(llama_program, prompts, tmp_path, pipeline):
    ids, mask = prompts
    runtime, _ = runtime_for(llama_program, parse_pipeline(pipeline))
    logits, cache = runtime._prefill(ids, mask, 8)
    ort_cache = cache.clone()   # the eager runtime writes its cache in place
    token = logits.argmax(-1)
    from tcompile.runtime.onnx_decode import export_decode_onnx
    ort_step = export_decode_onnx(runtime, token, cache, 8, tmp_path / "decode.onnx")
    worst = 0.0
    for _ in range(16):
        eager = runtime._decode(token, cache, 8)
        onnx = ort_step.step(token, ort_cache)
        worst = max(worst, (eager - onnx).abs().max().item())
        assert cache.entries == ort_cache.entries == 8 and cache.slots == ort_cache.slots == 9
        assert torch.equal(cache.slot, ort_cache.slot)
        token = eager.argmax(-1)
    assert worst <= 1e-4, worst
