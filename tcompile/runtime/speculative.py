"""Speculative decoding in the generation runtime: draft → verify → accept → roll back.

Each step, the drafter proposes a tree of candidates per row after the last emitted token (the
root); the verify step (``verify.py``) scores root and candidates in one call, writing their K/V
into the slots after each row's last entry; the acceptance rule (``acceptance.py``) keeps a path
from the root and emits one more token (the bonus). Rollback is bookkeeping only: the kept
entries are marked valid with their positions, the others stay invalid and are written over by
the next step. A tree path that is not a prefix of the node order is compacted by moving the few
kept entries next to each other (a copy of ≤ depth entries per layer, never of the cache).
Rows accept different lengths: every row has its own slots, positions and count.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (ICML 2023);
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from tcompile.runtime.acceptance import accept_greedy, accept_sample
from tcompile.runtime.drafters import Drafter, DraftTree
from tcompile.runtime.generate import GROW_SLOTS, GenerationStats, LMRuntime, add_slots, append_slot
from tcompile.runtime.sampling import check_sampling, next_tokens, warp_logits
from tcompile.runtime.speculative_kv import evict_accepted


@dataclass
class SpeculativeStats(GenerationStats):
    """``GenerationStats`` plus what the speculative loop did."""

    drafter: str = ""
    acceptance: str = "greedy"
    lossy: bool = False
    steps: int = 0                 # verify calls
    row_steps: int = 0             # verify calls × rows still generating
    drafted: int = 0               # candidate tokens scored (tree nodes included)
    accepted: int = 0              # candidate tokens accepted
    total_s: float = 0.0           # prefill + every step
    draft_s: float = 0.0           # the drafter's share of the steps: propose, pack the tree, observe
    verify_s: float = 0.0          # the verify calls (inputs built, model run)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step and row (accepted candidates + the bonus token)."""
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def ms_per_token(self) -> float | None:
        """Mean decode milliseconds per new token after the first (steps emit several)."""
        if self.new_tokens <= 1 or not self.decode_s:
            return None
        return 1e3 * sum(self.decode_s) / (self.new_tokens - 1)

    def step_split_ms(self) -> dict[str, float]:
        """Mean milliseconds per step: the whole step, its verify call, the drafter's work, and the
        rest (acceptance, cache commit, eviction). A speculative step pays off only if the verify
        call costs little more than a one-token decode step; this says where the rest goes."""
        if not self.steps:
            return {}
        step = 1e3 * sum(self.decode_s) / self.steps
        verify, draft = 1e3 * self.verify_s / self.steps, 1e3 * self.draft_s / self.steps
        return {"step_ms": step, "verify_ms": verify, "draft_ms": draft, "other_ms": step - verify - draft}

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "decode_s"}
        out.update(acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length,
                   tokens_per_s=self.tokens_per_s, ms_per_token=self.ms_per_token(), **self.step_split_ms())
        return out


def pack(trees: list[DraftTree], roots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trees → (ids [B, T], depth [B, T], ancestor-or-self mask [B, T, T]); node i of a tree is
    index i + 1, index 0 the root; rows with fewer nodes are padded with isolated nodes."""
    b, t = len(trees), 1 + max(tree.size for tree in trees)
    ids = roots[:, None].repeat(1, t)
    depth = torch.ones(b, t, dtype=torch.long)
    depth[:, 0] = 0
    anc = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    anc[:, :, 0] = True
    for row, tree in enumerate(trees):
        if tree.size:
            ids[row, 1:1 + tree.size] = torch.tensor(tree.tokens)
            depth[row, 1:1 + tree.size] = torch.tensor(tree.depth())
        for i, p in enumerate(tree.parents):
            if p >= 0:
                anc[row, i + 1] |= anc[row, p + 1]
    return ids, depth, anc


def greedy_argmax(logits: torch.Tensor, top: torch.return_types.topk | None = None) -> torch.Tensor:
    """``logits.argmax(-1)``, read from ``top`` (``logits.topk(≥ 2)``, computed for the drafter)
    where the best token is unique; a tie falls back to ``argmax`` and its first-index rule, so
    the result always equals plain greedy's choice. Saves a pass over [B, T, V] logits a step."""
    if top is None or top.values.shape[-1] < 2:
        return logits.argmax(dim=-1)
    values, best = top.values, top.indices[..., 0]
    tied = values[..., 0] == values[..., 1]
    return torch.where(tied, logits.argmax(dim=-1), best) if bool(tied.any()) else best


def trim(tree: DraftTree, depth: int) -> DraftTree:
    """The nodes of ``tree`` at most ``depth`` deep (parents stay before their children)."""
    if depth <= 0:
        return DraftTree([], [])
    keep = [i for i, d in enumerate(tree.depth()) if d <= depth]
    if len(keep) == tree.size:
        return tree
    if keep != list(range(len(keep))):   # not a prefix: drop through the remap
        remap = {old: new for new, old in enumerate(keep)}
        return DraftTree([tree.tokens[i] for i in keep], [remap.get(tree.parents[i], -1) for i in keep],
                         None if tree.q is None else tree.q[keep])
    return DraftTree(tree.tokens[:len(keep)], tree.parents[:len(keep)], None if tree.q is None else tree.q[:len(keep)])


def verify_into(verify_fn: Callable[..., Any], spec: Any, cache: Any, ids: torch.Tensor, depth: torch.Tensor,
                anc: torch.Tensor, grow: int = GROW_SLOTS) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Score ``ids`` [B, T] (positions ``seen + depth``, ancestor mask ``anc``) against the cache,
    writing their entries after each row's last one. Returns (logits [B, T, V], slots [B, T],
    per-layer attention scores [B, Hkv, T, S] when the verify graph exposes them, else []).
    Buffers short of T free slots grow by at least ``grow`` slots."""
    b, t = ids.shape
    base = append_slot(cache.valid)
    need = int(base.max()) + t - cache.slots
    if need > 0:
        add_slots(cache, max(grow, need))
    slots = base[:, None] + torch.arange(t)
    attend = cache.valid[:, None, :].expand(b, t, cache.slots).clone()
    attend.scatter_(2, slots[:, None, :].expand(b, t, t), anc)
    slot4 = slots[:, None, None, :].expand(b, spec.num_layers, spec.kv_heads, t).contiguous()
    outs = verify_fn(ids, cache.seen[:, None] + depth, attend, slot4, tuple(cache.kv))
    cache.kv = list(outs[1:1 + 2 * spec.num_layers])
    return outs[0], slots, list(outs[1 + 2 * spec.num_layers:])


def commit(cache: Any, slots: torch.Tensor, paths: list[list[int]]) -> None:
    """Keep the entries of each row's accepted path (indices into ``slots``; compacted to the
    first slots when the path skips some); every other entry of the step stays invalid."""
    b, t = slots.shape
    n = torch.tensor([len(p) for p in paths])
    # each entry out of place moves to its slot: one copy per buffer (a path holds ≤ depth
    # entries, usually one or two out of place; moving in path order never reads a slot already
    # written, as path[j] ≥ j)
    where = slots.tolist()
    moves = [(row, where[row][path[j]], where[row][j])
             for row, path in enumerate(paths) for j in range(len(path)) if path[j] != j]
    for row, src, dst in moves:
        for buf in cache.kv:
            buf[row, :, dst].copy_(buf[row, :, src])
    kept = torch.arange(t)[None] < n[:, None]
    cache.valid.scatter_(1, slots, kept)
    pos = torch.where(kept, cache.seen[:, None] + torch.arange(t), torch.full_like(slots, -1))
    shape = (b, cache.pos.shape[1], cache.pos.shape[2], t)
    cache.pos.scatter_(3, slots[:, None, None, :].expand(shape), pos[:, None, None, :].expand(shape))
    cache.seen = cache.seen + n


class SpeculativeRuntime(LMRuntime):
    """``LMRuntime`` whose ``generate`` decodes speculatively with ``drafter`` and ``verify``."""

    def __init__(self, prefill: Callable[..., Any], decode: Callable[..., Any], spec: Any, verify: Callable[..., Any],
                 drafter: Drafter, k: int, acceptance: str = "greedy", delta: float = 0.0,
                 neighbours: Callable[[], torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(prefill, decode, spec, **kwargs)
        self.verify_fn, self.drafter, self.k, self.acceptance, self.delta = verify, drafter, k, acceptance, delta
        self._neighbours = neighbours
        self.last_stats = SpeculativeStats()

    def _verify(self, cache: Any, ids: torch.Tensor, depth: torch.Tensor, anc: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, slots, self._scores = verify_into(self.verify_fn, self.spec, cache, ids, depth, anc,
                                                  grow=1 if self.evicts else GROW_SLOTS)
        return logits, slots

    def _commit(self, cache: Any, slots: torch.Tensor, paths: list[list[int]]) -> None:
        commit(cache, slots, paths)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """As ``LMRuntime.generate``; greedy output equals it token for token, sampled output has
        the same distribution (``acceptance="lantern"``: within its total-variation bound)."""
        input_ids, mask = self._check(input_ids, attention_mask, max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        if do_sample and self.acceptance == "greedy":
            raise ValueError("this runtime was built with speculative{acceptance='greedy'}, which only decodes "
                             "greedily; use do_sample=False, or acceptance='sample' (lossless) to sample")
        stats = SpeculativeStats(prompt_tokens=int(input_ids.shape[1]), drafter=self.drafter.name,
                                 acceptance=self.acceptance if do_sample else "greedy",
                                 lossy=do_sample and self.acceptance == "lantern" and self.delta > 0)
        started = time.perf_counter()
        eos, pad, logits, cache, capacity = self._start(input_ids, mask, eos_token_id, pad_token_id, stats)
        batch = input_ids.shape[0]
        contexts = [input_ids[row][mask[row].bool()] for row in range(batch)]
        self.drafter.configure(do_sample, temperature, top_k, top_p, generator)
        self.drafter.reset(contexts)
        first = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        emitted: list[list[int]] = [[int(t)] for t in first]
        done = [bool(eos) and int(t) in eos for t in first]
        peak_entries, peak_bytes = cache.entries, cache.nbytes()
        neighbours = self._neighbours() if (do_sample and self.acceptance == "lantern" and self.delta > 0) else None
        while not all(d or len(e) >= max_new_tokens for d, e in zip(done, emitted)):
            step_started = time.perf_counter()
            live = [not d and len(e) < max_new_tokens for d, e in zip(done, emitted)]
            rows = [row for row in range(batch) if live[row]]
            room = max(max_new_tokens - len(emitted[row]) - 1 for row in rows)
            ctx = [torch.cat([contexts[row], torch.tensor(emitted[row])]) for row in range(batch)]
            trees = self.drafter.propose(ctx, min(self.k, room)) if room > 0 else [DraftTree([], [])] * batch
            trees = [trim(tree, max_new_tokens - len(emitted[row]) - 1) if live[row] else DraftTree([], [])
                     for row, tree in enumerate(trees)]
            roots = torch.tensor([e[-1] for e in emitted])
            step_ids, depth, anc = pack(trees, roots)
            verify_started = time.perf_counter()
            stats.draft_s += verify_started - step_started
            logits, slots = self._verify(cache, step_ids, depth, anc)
            stats.verify_s += time.perf_counter() - verify_started
            top = None
            if do_sample:
                probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            else:
                if self.drafter.top_candidates:
                    top = logits.topk(min(max(self.drafter.top_candidates, 2), logits.shape[-1]), dim=-1)
                argmax = greedy_argmax(logits, top).tolist()
            paths: list[list[int]] = []
            for row in range(batch):
                if not live[row]:
                    paths.append([])    # nothing of a finished row is kept
                    continue
                tree = trees[row]
                if do_sample:
                    path, bonus = accept_sample(tree, probs[row], generator, neighbours, self.delta)
                else:
                    path, bonus = accept_greedy(tree, argmax[row])
                paths.append(path)
                new = [tree.tokens[i - 1] for i in path[1:]] + [bonus]
                stats.drafted += tree.size
                stats.accepted += len(path) - 1
                stats.row_steps += 1
                for token in new:
                    if len(emitted[row]) >= max_new_tokens or done[row]:
                        break
                    emitted[row].append(token)
                    done[row] = bool(eos) and token in eos
            sizes = torch.tensor([1 + tree.size if live[row] else 0 for row, tree in enumerate(trees)])
            observe_started = time.perf_counter()
            self.drafter.observe(step_ids, logits, paths, torch.arange(step_ids.shape[1])[None] < sizes[:, None],
                                 None if top is None else top.indices)
            stats.draft_s += time.perf_counter() - observe_started
            self._commit(cache, slots, paths)
            if self.evicts:
                evict_accepted(cache, self.policy, capacity, slots, paths, self._scores)
            stats.steps += 1
            stats.decode_s.append(time.perf_counter() - step_started)
            peak_entries, peak_bytes = max(peak_entries, cache.entries), max(peak_bytes, cache.nbytes())
        width = max(len(e) for e in emitted)
        out = torch.full((batch, width), pad, dtype=input_ids.dtype)
        for row, e in enumerate(emitted):
            out[row, :len(e)] = torch.tensor(e)
        stats.new_tokens = width
        stats.total_s = time.perf_counter() - started
        stats.peak_cache_entries, stats.peak_cache_bytes = peak_entries, peak_bytes
        stats.full_cache_bytes = self.spec.cache_bytes(batch, input_ids.shape[1] + width - 1)
        self.last_stats = stats
        self.last_cache = cache   # the final cache, for inspection (tests, reports)
        return torch.cat([input_ids, out], dim=1)
