"""The decode step with its KV eviction inside, exported to ONNX and run in ONNX Runtime.

``EvictingDecode`` wraps a captured (and rewritten) functional decode graph together with the
runtime's ``step_cache``, so one step maps the cache to the cache: the model step writing the new
entry into its slot, the scores, the ranking and the choice of the next slot to overwrite are all
in one graph. The cache never grows in this mode (capacity + 1 slots), so one graph serves every
step after prefill. Shapes are static in the exported step: batch and slots are those of the
export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tcompile.errors import BackendUnavailableError
from tcompile.runtime.generate import CacheState, LMRuntime, step_cache


class EvictingDecode(torch.nn.Module):
    """(ids [B,1], seen [B], valid [B,S], slot [B,L,Hkv], pos [B,L,Hkv,S], (state,) or (), kv…)
    → (logits, valid, slot, pending, pos, [state], kv…)."""

    def __init__(self, runtime: LMRuntime, capacity: int) -> None:
        super().__init__()
        if not runtime.evicts:
            raise ValueError("EvictingDecode needs a runtime with a KV policy in decode='evict' mode")
        self.runtime, self.capacity = runtime, capacity

    def forward(self, input_ids: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor,
                pos: torch.Tensor, state: tuple[torch.Tensor, ...], kv: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, ...]:
        logits, valid, slot, pending, pos, new_state, kv = step_cache(
            self.runtime.decode_graph, self.runtime._split, self.runtime.policy, self.capacity, input_ids[:, 0],
            seen, valid, slot, pos, state[0] if state else None, list(kv))
        return (logits, valid, slot, pending, pos, *(() if new_state is None else (new_state,)), *kv)


def _inputs(token: torch.Tensor, cache: CacheState) -> tuple:
    state = () if cache.state is None else (cache.state,)
    return (token[:, None], cache.seen, cache.valid, cache.slot, cache.pos, state, tuple(cache.kv))


def export_decode_onnx(runtime: LMRuntime, token: torch.Tensor, cache: CacheState, capacity: int,
                       path: Path) -> "OrtDecode":
    """Export the evicting decode step at the shapes of ``cache`` (after prefill) to ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("ONNX export of the decode step needs onnx, onnxscript and onnxruntime: "
                                      "pip install 'tcompile[onnx]'") from exc
    module = EvictingDecode(runtime, capacity).eval()
    with torch.no_grad():
        program = torch.onnx.export(module, _inputs(token, cache), dynamo=True, verbose=False)
    program.save(str(path))
    return OrtDecode(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), cache)


class OrtDecode:
    """Steps an exported evicting decode graph in ONNX Runtime, threading the cache through."""

    def __init__(self, session: Any, cache: CacheState) -> None:
        self.session = session
        self.n_state = int(cache.state is not None)
        self.names = [i.name for i in session.get_inputs()]

    def step(self, token: torch.Tensor, cache: CacheState) -> torch.Tensor:
        """One decode step; replaces the tensors of ``cache`` (as the eager runtime does) and returns logits."""
        flat = [token[:, None], cache.seen, cache.valid, cache.slot, cache.pos,
                *([] if cache.state is None else [cache.state]), *cache.kv]
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.names, flat)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        logits, cache.valid, cache.slot, cache.pending, cache.pos = outs[:5]
        cache.state = outs[5] if self.n_state else None
        cache.kv = outs[5 + self.n_state:]
        cache.seen = cache.seen + 1
        return logits
