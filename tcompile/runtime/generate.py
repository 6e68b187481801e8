"""The generation runtime: drives a captured prefill step and decode step with a KV policy.

The cache lives here as plain tensors (see ``lm_capture``): per layer K, V buffers
[B, Hkv, S, d] of S slots, the original position of each slot's entry [B, Hkv, S] (-1: empty or
padding), the policy's per-entry state, and one validity mask [B, S] shared by all layers and
heads. Each decode step writes the new entry into ``slot`` [B, L, Hkv] in place and never copies
the cache. With a policy in ``decode="evict"`` mode the buffers have capacity + 1 slots: once a
row is full, every step ranks its entries and the lowest-ranked one (per layer and KV head) is
evicted by letting the next step write over it, so memory stays at the budget for any output
length. Without a policy (or with ``decode="grow"``) the next step appends after the last entry,
and the buffers grow by ``GROW_SLOTS`` when a row runs out of slots.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tcompile.passes.kv_eviction import KVPolicy
from tcompile.passes.kv_ops import gather, select
from tcompile.passes.prompt_pruning import pooled_scores, select_tokens
from tcompile.runtime.lm_capture import LMSpec
from tcompile.runtime.sampling import check_sampling, next_tokens

GROW_SLOTS = 64   # slots a growing cache adds at once: one copy of the cache per 64 tokens, not per token


@dataclass
class CacheState:
    kv: list[torch.Tensor]            # K0, V0, K1, V1, ... [B, Hkv, S, d]
    pos: torch.Tensor                 # [B, L, Hkv, S] original position of each slot's entry (-1: empty)
    state: torch.Tensor | None        # [B, L, Hkv, S] the policy's per-entry state
    valid: torch.Tensor               # [B, S] bool: slots holding an entry, shared by every layer and head
    seen: torch.Tensor                # [B] real tokens seen so far (the next token's position)
    slot: torch.Tensor                # [B, L, Hkv] where the next step writes its entry (S: grow first)
    pending: torch.Tensor             # [B] bool: the row's ``slot`` holds an evicted entry, overwritten next

    @property
    def slots(self) -> int:
        return int(self.valid.shape[1])

    @property
    def entries(self) -> int:
        """Entries kept (evicted ones awaiting their overwrite not counted), the most of any row."""
        return int((self.valid.sum(dim=1) - self.pending.to(torch.long)).max())

    def nbytes(self) -> int:
        """Bytes of the K and V buffers actually allocated."""
        return sum(t.numel() * t.element_size() for t in self.kv)

    def clone(self) -> "CacheState":
        """An independent copy (decode steps write the buffers in place)."""
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()
        return CacheState([copy(t) for t in self.kv], copy(self.pos), copy(self.state), copy(self.valid), copy(self.seen), copy(self.slot), copy(self.pending))


@dataclass
class GenerationStats:
    """What the last ``generate`` call did, for benchmarks and the report."""

    prompt_tokens: int = 0
    prompt_tokens_kept: int = 0        # after prompt pruning (= the prompt's real tokens without it)
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
    """Rank each layer's prompt entries with ``rank(layer) -> (priority, state)`` and, when there
    are more than ``capacity``, keep the top ``capacity`` per KV head (valid ones first): the
    eviction at the end of prefill."""
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


def append_slot(valid: torch.Tensor) -> torch.Tensor:
    """[B]: the slot after each row's last entry (== S when the row's last slot is taken)."""
    order = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    return (valid.to(torch.long) * order).amax(dim=1)


def add_slots(cache: CacheState, extra: int) -> None:
    """Grow every buffer by ``extra`` empty slots (one copy of the cache)."""
    def pad(t: torch.Tensor, fill: float, dim: int = -1) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)
    cache.kv = [pad(t, 0.0, dim=2) for t in cache.kv]
    cache.pos = pad(cache.pos, -1)
    cache.state = None if cache.state is None else pad(cache.state, 0.0)
    cache.valid = pad(cache.valid, False)


def book(policy: KVPolicy | None, capacity: int | None, scores: list[torch.Tensor], pos: torch.Tensor,
         state: torch.Tensor | None, valid: torch.Tensor, seen: torch.Tensor, slot: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Book the entry a decode step wrote at ``slot`` (position ``seen``) and choose where the next
    step writes: after the row's last entry while there is room, else (with a policy) over the
    lowest-ranked entry of each layer and KV head, which is thereby evicted. Pure tensor code:
    the runtime calls it, and ``EvictingDecode`` traces it into the exported decode step. Every
    layer is booked at once ([B, L, Hkv, S] tensors): a few ops per step, not a few per layer.
    Returns (pos, state, next slot [B, L, Hkv], pending eviction [B])."""
    slots = valid.shape[1]
    append = append_slot(valid)
    full = append >= slots
    written = torch.arange(slots, device=valid.device) == slot[..., None]                 # [B, L, Hkv, S]
    pos = torch.where(written, seen[:, None, None, None], pos)
    nxt = append[:, None, None].expand_as(slot)
    if policy is None:
        return pos, state, nxt, torch.zeros_like(full)
    state = policy.admit(state, written)
    priority, state = policy.decode(torch.stack(scores, dim=1) if scores else None, pos, seen + 1, state, capacity)
    victims = priority.masked_fill(~valid[:, None, None, :], float("inf")).argmin(dim=-1)  # [B, L, Hkv]
    return pos, state, torch.where(full[:, None, None], victims, nxt), full


def step_cache(decode: Callable[..., Any], split: Callable[[tuple], tuple], policy: KVPolicy | None,
               capacity: int | None, token: torch.Tensor, seen: torch.Tensor, valid: torch.Tensor,
               slot: torch.Tensor, pos: torch.Tensor, state: torch.Tensor | None, kv: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, list]:
    """One decode step on the cache tensors: write the token's entry, attend, book, choose the next
    slot. Returns (logits, valid, slot, pending, pos, state, kv)."""
    valid = valid.scatter(1, slot[:, 0, :1], True)
    logits, kv, scores = split(decode(token[:, None], seen[:, None], valid, slot, tuple(kv)))
    pos, state, slot, pending = book(policy, capacity, scores, pos, state, valid, seen, slot)
    return logits, valid, slot, pending, pos, state, kv


@dataclass(frozen=True)
class PromptFilter:
    """GemFilter's first pass (``passes/prompt_pruning.py``): ``fn(ids, mask) -> (scores [B, N],)``."""

    fn: Callable[..., Any]
    keep: int
    kernel: int
    tail: int

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept ids, their mask, kept original indices); the prompt as it is when it fits ``keep``."""
        if int(mask.sum(dim=1).max()) <= self.keep:
            return ids, mask, torch.where(mask > 0, torch.arange(ids.shape[1]).expand_as(ids), -1)
        scores = pooled_scores(self.fn(ids, mask)[0], mask, self.kernel)
        return select_tokens(ids, mask, scores, self.keep, self.tail)


class LMRuntime:
    """Runs ``prefill(ids, mask)`` and ``decode(ids, pos, valid, kv)`` callables to generate."""

    def __init__(self, prefill: Callable[..., Any], decode: Callable[..., Any], spec: LMSpec,
                 policy: KVPolicy | None = None, decode_graph: Callable[..., Any] | None = None,
                 prompt_filter: PromptFilter | None = None) -> None:
        """``decode`` may write the cache in place; ``decode_graph`` is its functional form, for export.
        ``prompt_filter`` prunes long prompts before prefill (GemFilter)."""
        self.prefill_fn, self.decode_fn, self.spec, self.policy = prefill, decode, spec, policy
        self.decode_graph = decode if decode_graph is None else decode_graph
        self.prefill_graph = prefill   # the torch graph, kept for export when prefill_fn becomes an engine
        self.prompt_filter = prompt_filter
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

    @property
    def evicts(self) -> bool:
        """Whether the policy evicts while decoding (else the cache grows after prefill)."""
        return self.policy is not None and self.policy.options.decode == "evict"

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, CacheState]:
        logits, kv, scores = self._split(self.prefill_fn(ids, mask))
        valid = mask.bool()
        seen = mask.sum(dim=1)
        pos0 = torch.where(valid, mask.cumsum(dim=1) - 1, torch.full_like(mask, -1))
        pos = [pos0[:, None, :].expand(-1, kv[0].shape[1], -1) for _ in range(self.spec.num_layers)]
        state: list[torch.Tensor | None] = [None] * self.spec.num_layers
        if self.policy is not None:
            kv, pos, state, valid = rank_and_cut(
                lambda layer: self.policy.prefill(scores[layer] if scores else None, pos[layer], seen, capacity),
                capacity, kv, pos, state, valid)
        b, heads = ids.shape[0], self.spec.kv_heads
        cache = CacheState(kv, torch.stack(pos, dim=1), None if state[0] is None else torch.stack(state, dim=1),
                           valid, seen, torch.zeros(b, self.spec.num_layers, heads, dtype=torch.long),
                           torch.zeros(b, dtype=torch.bool))
        add_slots(cache, capacity + 1 - cache.slots if self.evicts else GROW_SLOTS)
        cache.slot = append_slot(cache.valid)[:, None, None].expand_as(cache.slot).contiguous()
        return logits, cache

    def _decode(self, token: torch.Tensor, cache: CacheState, capacity: int | None) -> torch.Tensor:
        if int(cache.slot.max()) >= cache.slots:   # no policy (or decode="grow") and a row is full
            add_slots(cache, GROW_SLOTS)
        logits, cache.valid, cache.slot, cache.pending, cache.pos, cache.state, cache.kv = step_cache(
            self.decode_fn, self._split, self.policy if self.evicts else None, capacity, token, cache.seen,
            cache.valid, cache.slot, cache.pos, cache.state, cache.kv)
        cache.seen = cache.seen + 1
        return logits

    @torch.no_grad()
    def teacher_force(self, prompt_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] predicting each token of ``continuation`` [T] after ``prompt_ids`` [N], with
        the cache evicted as it goes: the quality probe of the planner and of perplexity benches."""
        ids, mask = self._check(prompt_ids, None, max(int(continuation.numel()), 1))
        if self.prompt_filter is not None:
            ids, mask, _ = self.prompt_filter(ids, mask)
        capacity = self.capacity(int(ids.shape[1]))
        logits, cache = self._prefill(ids, mask, capacity)
        out = [logits[0]]
        for token in continuation[:-1].tolist():
            logits = self._decode(torch.tensor([token]), cache, capacity)
            out.append(logits[0])
        return torch.stack(out)

    # -- the loop -------------------------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor, mask: torch.Tensor, eos_token_id: int | list[int] | None,
               pad_token_id: int | None, stats: GenerationStats
               ) -> tuple[tuple[int, ...], int, torch.Tensor, CacheState, int | None]:
        """What every generation loop does first: resolve eos/pad, prune the prompt (GemFilter),
        prefill and cut the cache to the policy's capacity, recording prompt and prefill figures in
        ``stats``. Returns (eos ids, pad id, last logits, cache, capacity)."""
        eos = self.spec.eos_token_ids if eos_token_id is None else (
            tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,))
        pad = pad_token_id if pad_token_id is not None else (self.spec.pad_token_id if self.spec.pad_token_id
                                                             is not None else (eos[0] if eos else 0))
        started = time.perf_counter()
        ids, prompt_mask = input_ids, mask
        if self.prompt_filter is not None:
            ids, prompt_mask, _ = self.prompt_filter(input_ids, mask)
        stats.prompt_tokens_kept = int(prompt_mask.sum(1).max())
        capacity = self.capacity(stats.prompt_tokens_kept)
        stats.capacity = capacity
        logits, cache = self._prefill(ids, prompt_mask, capacity)
        stats.prefill_s = time.perf_counter() - started
        stats.cache_entries_after_prefill = cache.entries
        return eos, pad, logits, cache, capacity

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt ids [B, N] (left padded) → ids [B, N + T], T ≤ max_new_tokens (all rows stopped)."""
        input_ids, mask = self._check(input_ids, attention_mask, max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        stats = GenerationStats(prompt_tokens=int(input_ids.shape[1]))
        eos, pad, logits, cache, capacity = self._start(input_ids, mask, eos_token_id, pad_token_id, stats)
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
