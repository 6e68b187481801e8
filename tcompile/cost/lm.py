"""Predicted latency of a causal-LM generation workload: prefill + decode steps (+ speculation).

Why analytic: the LM planner ranks a dozen plans before it measures any, and one measured
SmolLM2 generation costs seconds. Each step graph is priced by the roofline model
(:func:`tcompile.cost.predict_latency`) at the shapes the workload gives it, fake tensors only:

- prefill: the (rewritten) prefill graph at the prompt length; with GemFilter, the filter graph
  at the prompt length plus the prefill at the kept length;
- decode: the decode graph at the cache size of the step (the prompt plus half the new tokens
  for a growing cache, the policy's capacity for an evicting one), times the steps; the cost
  is linear in the cache size, so each decode graph is priced at two sizes (:class:`StepPricer`);
- speculation: one verify step per ``tokens_per_step`` emitted tokens (the expected accepted
  length + 1, from :func:`tcompile.runtime.acceptance_sim.simulate_acceptance`). A verify step
  of ``T`` draft tokens is priced as a decode step plus ``T`` tokens of the decode graph's
  matmul FLOPs at the profile's matmul rate: on CPU a step reads the weights once, and the extra
  tokens add compute only.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_leaves

from tcompile import _compat
from tcompile.cost.flops import graph_cost
from tcompile.cost.model import node_dtype, predict_latency


def priced_at(gm: Any, args: Sequence[Any], profile: Any) -> float:
    """Predicted seconds of ``gm`` on inputs shaped like ``args``: shapes re-propagated (fake
    tensors) on a copy, so the graph is priced at that size, not at its traced example."""
    gm = _compat.clone_graph_module(gm)
    _compat.fake_propagate(gm, tree_leaves(list(args)))
    return predict_latency(gm, profile)


def book_cost(policy: Any, capacity: int | None, book_args: Sequence[Any], profile: Any) -> float:
    """Predicted seconds of a decode step's cache bookkeeping outside the decode graph: the
    runtime's ``book`` (the entry's position, the policy's state update and ranking, the choice of
    the next slot: tens of ops over [B, L, Hkv, S] tensors) traced with ``make_fx`` at the step's
    shapes and priced like any graph. Why: at 2k entries a policy's ranking costs as much as a
    tenth of SmolLM2's decode step on this CPU, and it differs between policies (TOVA against
    StreamingLLM), so leaving it out mis-ranks the policies. ``book_args``: book's arguments after
    ``policy`` and ``capacity`` (scores, pos, state, valid, seen, slot)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from tcompile.runtime.generate import book
    scores, rest = list(book_args[0]), list(book_args[1:])

    def bookkeeping(scores: list[torch.Tensor], *rest: Any) -> Any:
        return book(policy, capacity, scores, *rest)
    gm = make_fx(bookkeeping, tracing_mode="fake")(scores, *rest)
    return predict_latency(gm, profile)


def prefill_args(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one ``tokens``-long prompt: the prefill graph's inputs."""
    ids = torch.zeros(1, tokens, dtype=torch.long)
    return ids, torch.ones_like(ids)


def decode_args(spec: Any, slots: int) -> tuple[Any, ...]:
    """The decode graph's inputs for one row and a cache of ``slots`` entries (see DecodeStep)."""
    kv = tuple(torch.zeros(1, spec.kv_heads, slots, spec.head_dim, dtype=spec.dtype)
               for _ in range(2 * spec.num_layers))
    return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, slots, dtype=torch.bool), torch.zeros(1, spec.num_layers, spec.kv_heads, dtype=torch.long),
            kv)


class StepPricer:
    """Prices a causal LM's step graphs for one device profile, caching what it priced.

    Why the cache and the line: fake-propagating SmolLM2's ~2,000-node graphs takes seconds, and
    the planner prices a dozen plans at several sizes. A decode step's cost is linear in the
    cache size (attention reads and cache bytes; everything else is constant), so each decode
    graph is priced at two sizes and read off the line; a prefill graph is priced per prompt
    length, once."""

    LINE_AT = (256, 2048)

    def __init__(self, spec: Any, profile: Any) -> None:
        self.spec, self.profile = spec, profile
        self._cache: dict[tuple, float] = {}
        self._alive: list[Any] = []     # graphs priced so far: kept so their id() is never reused

    def _priced(self, gm: Any, key: tuple, args: Sequence[Any]) -> float:
        full = (id(gm),) + key
        if full not in self._cache:
            self._cache[full] = priced_at(gm, args, self.profile)
            self._alive.append(gm)
        return self._cache[full]

    def prefill(self, prefill: Any, tokens: int, prompt_filter: Any = None) -> float:
        """Seconds of the prefill of a ``tokens`` prompt (GemFilter's filter run included)."""
        if prompt_filter is None or tokens <= prompt_filter.keep:
            return self._priced(prefill, ("prefill", tokens), prefill_args(tokens))
        return (self._priced(prompt_filter.fn, ("prefill", tokens), prefill_args(tokens))
                + self._priced(prefill, ("prefill", prompt_filter.keep), prefill_args(prompt_filter.keep)))

    def decode(self, decode: Any, slots: int) -> float:
        """Seconds of one decode step over a cache of ``slots`` entries (read off the line)."""
        (s0, s1) = self.LINE_AT
        y0 = self._priced(decode, ("decode", s0), decode_args(self.spec, s0))
        y1 = self._priced(decode, ("decode", s1), decode_args(self.spec, s1))
        return y0 + (y1 - y0) * (slots - s0) / (s1 - s0)

    def matmul_per_token(self, decode: Any) -> float:
        """Compute time one more token adds to a step: the decode graph's matmul FLOPs at the
        profile's matmul rate (what a verify step pays per draft token on a weight-bound device)."""
        key = (id(decode), "matmul")
        if key not in self._cache:
            from tcompile.cost.model import _resolve
            gm = getattr(decode, "graph_module", decode)
            dtype = next((node_dtype(n) for n in gm.graph.nodes if n.op == "call_function"), "float32")
            flops = sum(c.flops for _, c in graph_cost(gm).nodes if c.kind in ("matmul", "attention"))
            self._cache[key] = flops / _resolve(self.profile).matmul_rate(dtype)
        return self._cache[key]

    def generation(self, decode: Any, prefill_s: float, context: int, new_tokens: int,
                   tokens_per_step: float = 1.0, draft_tokens: int = 0) -> float:
        """Seconds to generate ``new_tokens`` after a prefill of ``prefill_s``: decode steps at a
        cache of ``context`` slots; with speculation, ``new_tokens / tokens_per_step`` verify
        steps of ``draft_tokens`` drafts each."""
        step = self.decode(decode, context) + draft_tokens * self.matmul_per_token(decode)
        return prefill_s + max(new_tokens - 1, 0) / max(tokens_per_step, 1.0) * step
