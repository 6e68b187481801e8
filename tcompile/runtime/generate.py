"""The generation runtime: drives a captured prefill step and decode step with a KV policy.

The cache lives here as plain tensors (see ``lm_capture``): per layer K, V [B, Hkv, C, d], the
original position of each entry [B, Hkv, C] (-1: empty or padding), the policy's per-entry
state, and one validity mask [B, C] shared by all layers and heads. With a policy, the cache is
cut to the budget's capacity at the end of prefill and, in ``decode="evict"`` mode, after every
decode step, so the tensors the runtime holds never exceed the capacity (plus the one entry a
step appends before evicting).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tcompile.passes.kv_eviction import KVPolicy
from tcompile.passes.kv_ops import gather, select
from tcompile.runtime.lm_capture import LMSpec
from tcompile.runtime.sampling import check_sampling, next_tokens


@dataclass
class CacheState:
    kv: list[torch.Tensor]            # K0, V0, K1, V1, ... [B, Hkv, C, d]
    pos: list[torch.Tensor]           # per layer [B, Hkv, C] original positions (-1: empty)
    state: list[torch.Tensor | None]  # per layer policy state [B, Hkv, C]
    valid: torch.Tensor               # [B, C] bool, shared by every layer and head
    seen: torch.Tensor                # [B] real tokens seen so far (the next token's position)

    @property
    def entries(self) -> int:
        return int(self.valid.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


@dataclass
class GenerationStats:
    """What the last ``generate`` call did, for benchmarks and the report."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    capacity: int | None = None
    cache_entries_after_prefill: int = 0
    peak_cache_entries: int = 0
    peak_cache_bytes: int = 0
    full_cache_bytes: int = 0          # what a full cache would hold at the end
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    def ms_per_token(self) -> float | None:
        if not self.decode_s:
            return None
        ordered = sorted(self.decode_s)
        return 1e3 * ordered[len(ordered) // 2]


def rank_and_cut(rank: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]], capacity: int | None,
                 kv: list[torch.Tensor], pos: list[torch.Tensor], state: list[torch.Tensor | None], valid: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """Rank each layer's entries with ``rank(layer) -> (priority, new state)`` and, when the cache
    holds more than ``capacity`` entries, keep the top ``capacity`` per KV head. The one eviction
    mechanism of prefill and decode."""
    cut = capacity is not None and valid.shape[1] > capacity
    kv, pos, state, new_valid = list(kv), list(pos), list(state), valid
    for layer in range(len(pos)):
        priority, state[layer] = rank(layer)
        if cut:
            idx, new_valid = select(priority, valid, capacity)
            kv[2 * layer], kv[2 * layer + 1] = gather(kv[2 * layer], idx), gather(kv[2 * layer + 1], idx)
            pos[layer] = gather(pos[layer], idx)
            if state[layer] is not None:
                state[layer] = gather(state[layer], idx)
    return kv, pos, state, new_valid


def append_and_evict(policy: KVPolicy | None, capacity: int | None, kv: list[torch.Tensor],
                     scores: list[torch.Tensor], pos: list[torch.Tensor], state: list[torch.Tensor | None],
                     valid: torch.Tensor, seen: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """Book the entry a decode step appended (slot C, position ``seen``) and, with a policy, evict
    back to ``capacity``. Pure tensor code: the runtime calls it, and ``EvictingDecode`` traces it
    into the exported decode step."""
    new_pos = seen[:, None, None].expand(-1, kv[0].shape[1], 1)
    pos = [torch.cat([p, new_pos], dim=-1) for p in pos]
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    if policy is None:
        return kv, pos, state, valid
    seen = seen + 1
    return rank_and_cut(lambda layer: policy.decode(scores[layer] if scores else None, pos[layer], seen,
                                                    state[layer], capacity), capacity, kv, pos, state, valid)


class LMRuntime:
    """Runs ``prefill(ids, mask)`` and ``decode(ids, pos, valid, kv)`` callables to generate."""

    def __init__(self, prefill: Callable[..., Any], decode: Callable[..., Any], spec: LMSpec,
                 policy: KVPolicy | None = None) -> None:
        self.prefill_fn, self.decode_fn, self.spec, self.policy = prefill, decode, spec, policy
        self.last_stats = GenerationStats()

    # -- input checks -------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise TypeError("input_ids must be an integer tensor of token ids [batch, tokens] (e.g. from the "
                            "model's tokenizer with return_tensors='pt')")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, tokens] with at least one token, got "
                             f"{tuple(input_ids.shape)}")
        bad = (input_ids < 0) | (input_ids >= self.spec.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"input_ids hold {int(bad.sum())} id(s) outside the vocabulary [0, "
                             f"{self.spec.vocab_size}) (e.g. {int(input_ids[bad][0])}); tokenize with this "
                             "model's own tokenizer")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                             f"{tuple(input_ids.shape)}; they must match")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("attention_mask has padding at the end of a row; tcompile generates with left "
                             "padding (tokenizer.padding_side = 'left')")
        if self.spec.max_positions is not None:
            longest = int(attention_mask.sum(1).max()) + max_new_tokens
            if longest > self.spec.max_positions:
                raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                                 f"{self.spec.max_positions} positions; shorten the prompt or max_new_tokens")
        return input_ids, attention_mask.to(torch.long)

    # -- cache steps ----------------------------------------------------------------------------
    def _split(self, outs: tuple) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        n_kv = 2 * self.spec.num_layers
        return outs[0], list(outs[1:1 + n_kv]), list(outs[1 + n_kv:])

    def capacity(self, prompt_tokens: int) -> int | None:
        if self.policy is None:
            return None
        o = self.policy.options
        if o.tokens is not None and o.tokens > prompt_tokens:
            raise ValueError(f"KV budget tokens={o.tokens} exceeds the prompt's {prompt_tokens} tokens, so nothing "
                             f"would be evicted at prefill; use tokens<={prompt_tokens} or a ratio")
        cap = self.policy.capacity(prompt_tokens)
        protected = self.policy.sinks + self.policy.window(cap)
        if o.ratio is not None and math.floor(o.ratio * prompt_tokens) < protected:
            raise ValueError(f"KV budget ratio={o.ratio} keeps {math.floor(o.ratio * prompt_tokens)} of "
                             f"{prompt_tokens} prompt entries, fewer than sinks + window = {protected}; raise "
                             "the ratio or lower sinks/window")
        return cap

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, CacheState]:
        logits, kv, scores = self._split(self.prefill_fn(ids, mask))
        valid = mask.bool()
        seen = mask.sum(dim=1)
        pos0 = torch.where(valid, mask.cumsum(dim=1) - 1, torch.full_like(mask, -1))
        pos = [pos0[:, None, :].expand(-1, kv[0].shape[1], -1) for _ in range(self.spec.num_layers)]
        cache = CacheState(kv, pos, [None] * self.spec.num_layers, valid, seen)
        if self.policy is not None:
            cache.kv, cache.pos, cache.state, cache.valid = rank_and_cut(
                lambda layer: self.policy.prefill(scores[layer] if scores else None, cache.pos[layer], seen, capacity),
                capacity, cache.kv, cache.pos, cache.state, cache.valid)
        return logits, cache

    def _decode(self, token: torch.Tensor, cache: CacheState, capacity: int | None) -> torch.Tensor:
        outs = self.decode_fn(token[:, None], cache.seen[:, None], cache.valid, tuple(cache.kv))
        logits, kv, scores = self._split(outs)
        evict = self.policy is not None and self.policy.options.decode == "evict"
        cache.kv, cache.pos, cache.state, cache.valid = append_and_evict(
            self.policy if evict else None, capacity, kv, scores, cache.pos, cache.state, cache.valid, cache.seen)
        cache.seen = cache.seen + 1
        return logits

    @torch.no_grad()
    def teacher_force(self, prompt_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] predicting each token of ``continuation`` [T] after ``prompt_ids`` [N], with
        the cache evicted as it goes: the quality probe of the planner and of perplexity benches."""
        ids, mask = self._check(prompt_ids, None, max(int(continuation.numel()), 1))
        capacity = self.capacity(int(ids.shape[1]))
        logits, cache = self._prefill(ids, mask, capacity)
        out = [logits[0]]
        for token in continuation[:-1].tolist():
            logits = self._decode(torch.tensor([token]), cache, capacity)
            out.append(logits[0])
        return torch.stack(out)

    # -- the loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt ids [B, N] (left padded) → ids [B, N + T], T ≤ max_new_tokens (all rows stopped)."""
        input_ids, mask = self._check(input_ids, attention_mask, max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        eos = self.spec.eos_token_ids if eos_token_id is None else (
            tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,))
        pad = pad_token_id if pad_token_id is not None else (self.spec.pad_token_id if self.spec.pad_token_id
                                                             is not None else (eos[0] if eos else 0))
        stats = GenerationStats(prompt_tokens=int(input_ids.shape[1]))
        capacity = self.capacity(int(mask.sum(1).max()))
        stats.capacity = capacity
        started = time.perf_counter()
        logits, cache = self._prefill(input_ids, mask, capacity)
        stats.prefill_s = time.perf_counter() - started
        stats.cache_entries_after_prefill = cache.entries
        eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        produced = []
        peak_entries, peak_bytes = cache.entries, cache.nbytes()
        for step in range(max_new_tokens):
            token = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            produced.append(token)
            if eos_t is not None:
                done = done | torch.isin(token, eos_t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            started = time.perf_counter()
            logits = self._decode(token, cache, capacity)
            stats.decode_s.append(time.perf_counter() - started)
            peak_entries, peak_bytes = max(peak_entries, cache.entries), max(peak_bytes, cache.nbytes())
        stats.new_tokens = len(produced)
        stats.peak_cache_entries, stats.peak_cache_bytes = peak_entries, peak_bytes
        stats.full_cache_bytes = self.spec.cache_bytes(input_ids.shape[0], input_ids.shape[1] + len(produced) - 1)
        self.last_stats = stats
        return torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1)
