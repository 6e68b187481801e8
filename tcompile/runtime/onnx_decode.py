"""The decode step with its KV eviction inside, exported to ONNX and run in ONNX Runtime.

``EvictingDecode`` wraps a captured (and rewritten) decode graph together with the policy's
``append_and_evict``, so one step maps the cache at capacity C to the cache at capacity C: the
model step, the scores, the ranking, top-k and the gathers are all in one graph. It is exported
at steady state (the cache already at capacity), which is every step after prefill once the
prompt is longer than the budget. Shapes are static in the exported step: batch and capacity
are those of the export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tcompile.errors import BackendUnavailableError
from tcompile.runtime.generate import CacheState, LMRuntime, append_and_evict


class EvictingDecode(torch.nn.Module):
    """(ids [B,1], seen [B], valid [B,C], pos per layer, state per layer, kv) → (logits, valid, pos…, state…, kv…)."""

    def __init__(self, runtime: LMRuntime, capacity: int) -> None:
        super().__init__()
        if runtime.policy is None or runtime.policy.options.decode != "evict":
            raise ValueError("EvictingDecode needs a runtime with a KV policy in decode='evict' mode")
        self.runtime, self.capacity = runtime, capacity
        self.decode = runtime.decode_fn
        self.layers = runtime.spec.num_layers

    def forward(self, input_ids: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor, pos: tuple[torch.Tensor, ...],
                state: tuple[torch.Tensor, ...], kv: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits, new_kv, scores = self.runtime._split(self.decode(input_ids, seen[:, None], valid, kv))
        states = list(state) if state else [None] * self.layers
        new_kv, new_pos, new_state, new_valid = append_and_evict(self.runtime.policy, self.capacity, new_kv, scores,
                                                                  list(pos), states, valid, seen)
        kept_state = tuple(s for s in new_state if s is not None)
        return (logits, new_valid, *new_pos, *kept_state, *new_kv)


def _inputs(token: torch.Tensor, cache: CacheState) -> tuple:
    state = tuple(s for s in cache.state if s is not None)
    return (token[:, None], cache.seen, cache.valid, tuple(cache.pos), state, tuple(cache.kv))


def export_decode_onnx(runtime: LMRuntime, token: torch.Tensor, cache: CacheState, path: Path) -> "OrtDecode":
    """Export the evicting decode step at the shapes of ``cache`` (at capacity) to ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("ONNX export of the decode step needs onnx, onnxscript and onnxruntime: "
                                      "pip install 'tcompile[onnx]'") from exc
    module = EvictingDecode(runtime, cache.entries).eval()
    args = _inputs(token, cache)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    program.save(str(path))
    return OrtDecode(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), runtime, cache)


class OrtDecode:
    """Steps an exported evicting decode graph in ONNX Runtime, threading the cache through."""

    def __init__(self, session: Any, runtime: LMRuntime, cache: CacheState) -> None:
        self.session, self.layers = session, runtime.spec.num_layers
        self.n_state = sum(s is not None for s in cache.state)
        self.names = [i.name for i in session.get_inputs()]

    def step(self, token: torch.Tensor, cache: CacheState) -> torch.Tensor:
        """One decode step; updates ``cache`` in place (as the eager runtime does) and returns logits."""
        flat = [token[:, None], cache.seen, cache.valid, *cache.pos,
                *[s for s in cache.state if s is not None], *cache.kv]
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.names, flat)}
        outs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        logits, cache.valid = outs[0], outs[1]
        cache.pos = outs[2:2 + self.layers]
        states = outs[2 + self.layers:2 + self.layers + self.n_state]
        it = iter(states)
        cache.state = [next(it) if s is not None else None for s in cache.state]
        cache.kv = outs[2 + self.layers + self.n_state:]
        cache.seen = cache.seen + 1
        return logits
