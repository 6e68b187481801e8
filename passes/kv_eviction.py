"""KV-cache eviction passes for causal LMs: kv_streaming, kv_snapkv, kv_h2o, kv_tova.

Each pass is a graph rewrite plus a policy the runtime applies. The rewrite exposes the attention
scores the policy ranks entries by (``attention_scores``) on the prefill graph, the decode graph,
or both; the policy (a ``KVPolicy``) turns scores and entry positions into a keep priority, and
``kv_ops.select`` keeps the top ``capacity`` entries per KV head. The cache tensors really have
the budget's capacity: eviction runs at the end of prefill and, with ``decode="evict"`` (the
default), at every decode step, so memory stays at the budget for any output length;
``decode="grow"`` compresses once after prefill and lets the cache grow, as kvpress does.

Papers: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024);
Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024);
Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023); Oren et al., "Transformers are Multi-State RNNs" (TOVA, 2024).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext, PassSkipped
from tcompile.passes.attention_scores import expose_attention_scores
from tcompile.passes.kv_ops import pool_scores, protect
from tcompile.registry import get_pass, register_pass

DECODE_MODES = ("evict", "grow")


@dataclass(frozen=True)
class KVOptions:
    """Budget and protection shared by every KV pass."""

    ratio: float | None = None     # fraction of the prompt's entries kept, in (0, 1]
    tokens: int | None = None      # or: a fixed capacity in entries per KV head
    sinks: int = 0                 # first real tokens always kept
    window: int = 0                # most recent tokens always kept
    decode: str = "evict"          # "evict": constant memory while decoding | "grow": compress once (kvpress)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.ratio is not None and self.tokens is not None:
            raise PassOptionError(f"{name}: set ratio or tokens, not both")
        if self.ratio is None and self.tokens is None:
            object.__setattr__(self, "ratio", 0.5)
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise PassOptionError(f"{name}: ratio={self.ratio!r} must lie in (0, 1] (the fraction of entries kept)")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise PassOptionError(f"{name}: tokens={self.tokens!r} must be a positive integer")
        for field_name in ("sinks", "window"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 0:
                raise PassOptionError(f"{name}: {field_name}={value!r} must be a non-negative integer")
        if self.tokens is not None and self.tokens < self.sinks + self.window:
            raise PassOptionError(f"{name}: tokens={self.tokens} is smaller than sinks + window "
                                  f"({self.sinks} + {self.window}); raise tokens or lower sinks/window")
        if self.decode not in DECODE_MODES:
            raise PassOptionError(f"{name}: decode={self.decode!r} must be one of {DECODE_MODES}")


@dataclass(frozen=True)
class StreamingOptions(KVOptions):
    sinks: int = 4


@dataclass(frozen=True)
class SnapKVOptions(KVOptions):
    window: int = 32               # observation window: the last prompt tokens vote, and are kept
    kernel: int = 5                # pooling kernel over the votes
    pool: str = "avg"              # "avg" | "max"
    heads: str = "each"            # "each": per-KV-head selection (SnapKV) | "shared": one set per layer
    spread: str = "centered"       # pooling window: "centered" (SnapKV) | "forward" (a vote keeps what follows)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise PassOptionError("SnapKVOptions: window must be ≥ 1 (the observation window votes)")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise PassOptionError(f"SnapKVOptions: kernel={self.kernel!r} must be a positive odd integer")
        if self.pool not in ("avg", "max"):
            raise PassOptionError(f"SnapKVOptions: pool={self.pool!r} must be 'avg' or 'max'")
        if self.spread not in ("centered", "forward"):
            raise PassOptionError(f"SnapKVOptions: spread={self.spread!r} must be 'centered' or 'forward'")
        if self.heads not in ("each", "shared"):
            raise PassOptionError(f"SnapKVOptions: heads={self.heads!r} must be 'each' or 'shared'")


@dataclass(frozen=True)
class H2OOptions(KVOptions):
    window: int = -1               # recent tokens kept; -1: half the capacity (H2O's heavy = recent split)

    def __post_init__(self) -> None:
        if self.window == -1:
            object.__setattr__(self, "window", 0)
            super().__post_init__()
            object.__setattr__(self, "window", -1)
        else:
            super().__post_init__()


@dataclass(frozen=True)
class TOVAOptions(KVOptions):
    pass


class KVPolicy:
    """Family base: how a KV pass ranks cache entries. Higher priority is kept.

    ``prefill_rows``: the prompt queries whose attention the prefill graph must expose (None: no
    scores; 0: all rows). ``decode_scores``: whether the decode graph must expose the new query's.
    ``state`` is a per-entry tensor the policy carries along with the entries: [B, Hkv, C] for one
    layer at prefill, [B, L, Hkv, S] for every layer at once while decoding (policies are
    elementwise over entries and reduce heads over dim -2, so both shapes work).
    """

    prefill_rows: int | None = None
    decode_scores: bool = False

    def __init__(self, options: KVOptions) -> None:
        self.options = options

    def capacity(self, prompt_tokens: int) -> int:
        o = self.options
        cap = o.tokens if o.tokens is not None else max(1, math.floor(o.ratio * prompt_tokens))
        return max(cap, self.sinks + self.window(cap))

    @property
    def sinks(self) -> int:
        return self.options.sinks

    def window(self, capacity: int) -> int:
        return self.options.window

    def prefill(self, scores: torch.Tensor | None, pos: torch.Tensor, seen: torch.Tensor, capacity: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def admit(self, state: torch.Tensor | None, written: torch.Tensor) -> torch.Tensor | None:
        """The state of a decode step's new entry, written over the slots ``written`` [B, Hkv, S]."""
        return None if state is None else state.masked_fill(written, 0.0)

    def decode(self, scores: torch.Tensor | None, pos: torch.Tensor, seen: torch.Tensor, state: torch.Tensor | None,
               capacity: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Priority of every slot after a decode step (the new entry already admitted)."""
        raise NotImplementedError

    def _protected(self, priority: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor, capacity: int) -> torch.Tensor:
        return protect(priority, pos, seen, self.sinks, self.window(capacity))


class StreamingPolicy(KVPolicy):
    """StreamingLLM: the sinks plus the newest entries (newest first by position)."""

    def prefill(self, scores, pos, seen, capacity):
        return self._protected(pos.to(torch.float32), pos, seen, capacity), None

    def decode(self, scores, pos, seen, state, capacity):
        return self._protected(pos.to(torch.float32), pos, seen, capacity), None


class SnapKVPolicy(KVPolicy):
    """SnapKV: the last ``window`` prompt queries vote (softmax over all keys, summed over the
    window, averaged over each KV head's query group: the GQA fix), votes are pooled, the window
    is kept. While decoding (SnapKV itself never evicts then) a new entry gets a vote above all
    stored ones, so the least-voted prompt entries leave first."""

    decode_scores = False

    def __init__(self, options: SnapKVOptions) -> None:
        super().__init__(options)
        self.prefill_rows = options.window

    def prefill(self, scores, pos, seen, capacity):
        if self.options.heads == "shared":   # every KV head of the layer keeps the same entries
            scores = scores.mean(dim=-2, keepdim=True).expand_as(scores)
        votes = pool_scores(scores, self.options.kernel, self.options.pool, self.options.spread == "forward")
        return self._protected(votes, pos, seen, capacity), votes

    def admit(self, state, written):
        top = state.amax(dim=-1, keepdim=True) + 1.0   # above every vote, and no ties between new entries
        return torch.where(written, top, state)

    def decode(self, scores, pos, seen, state, capacity):
        return self._protected(state, pos, seen, capacity), state


class H2OPolicy(KVPolicy):
    """H2O: attention accumulated over every query so far (heavy hitters) plus a recent window."""

    prefill_rows = 0
    decode_scores = True

    def window(self, capacity: int) -> int:
        return capacity // 2 if self.options.window == -1 else self.options.window

    def prefill(self, scores, pos, seen, capacity):
        return self._protected(scores, pos, seen, capacity), scores

    def decode(self, scores, pos, seen, state, capacity):
        state = state + scores
        return self._protected(state, pos, seen, capacity), state


class TOVAPolicy(KVPolicy):
    """TOVA: keep the entries the current query attends to most (mean over all heads, the same
    ranking for every KV head); no sink or window unless asked."""

    prefill_rows = 1
    decode_scores = True

    def _mean_heads(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.mean(dim=-2, keepdim=True).expand_as(scores)

    def prefill(self, scores, pos, seen, capacity):
        return self._protected(self._mean_heads(scores), pos, seen, capacity), None

    def decode(self, scores, pos, seen, state, capacity):
        return self._protected(self._mean_heads(scores), pos, seen, capacity), None


POLICIES: dict[str, type[KVPolicy]] = {"kv_streaming": StreamingPolicy, "kv_snapkv": SnapKVPolicy,
                                       "kv_h2o": H2OPolicy, "kv_tova": TOVAPolicy}


def make_policy(name: str, options: KVOptions) -> KVPolicy:
    return POLICIES[name](options)


def _rewrite(name: str, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    stage = ctx.program.info.get("lm_stage")
    if stage is None:
        raise PassSkipped(f"{name} evicts KV-cache entries of causal LMs; this graph is not a prefill or decode "
                          "step (optimize a causal LM, e.g. LlamaForCausalLM, to use it)")
    policy = make_policy(name, ctx.options)
    rows = policy.prefill_rows if stage == "prefill" else (1 if policy.decode_scores else None)
    ctx.stats.update(stage=stage, scores_rows=rows, runtime=f"{type(policy).__name__} evicts in the generation runtime")
    if rows is None:
        return PassResult(gm, False)
    ctx.stats["score_outputs"] = expose_attention_scores(gm, rows, ctx.program.info["kv_heads"])
    return PassResult(gm, True)


@register_pass("kv_streaming", options=StreamingOptions, family="kv_eviction", exact=True)
def kv_streaming(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """StreamingLLM KV eviction: attention sinks plus a recent window."""
    return _rewrite("kv_streaming", gm, ctx)


@register_pass("kv_snapkv", options=SnapKVOptions, family="kv_eviction", exact=True)
def kv_snapkv(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """SnapKV KV eviction: an observation window of the last prompt queries votes for entries."""
    return _rewrite("kv_snapkv", gm, ctx)


@register_pass("kv_h2o", options=H2OOptions, family="kv_eviction", exact=True)
def kv_h2o(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """H2O KV eviction: accumulated-attention heavy hitters plus a recent window."""
    return _rewrite("kv_h2o", gm, ctx)


@register_pass("kv_tova", options=TOVAOptions, family="kv_eviction", exact=True)
def kv_tova(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """TOVA KV eviction: keep the entries the current query attends to most."""
    return _rewrite("kv_tova", gm, ctx)


def is_kv_pass(name: str) -> bool:
    return get_pass(name).family == "kv_eviction"
