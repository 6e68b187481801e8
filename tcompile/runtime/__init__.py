"""Causal-LM generation: prefill/decode capture with an explicit KV cache, and the runtime loop."""
from tcompile.runtime.generate import CacheState, GenerationStats, LMRuntime
from tcompile.runtime.lm_capture import LMProgram, LMSpec, capture_lm, is_causal_lm

__all__ = ["CacheState", "GenerationStats", "LMProgram", "LMRuntime", "LMSpec", "capture_lm", "is_causal_lm"]
