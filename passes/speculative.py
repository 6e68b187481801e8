"""The ``speculative`` pass: speculative decoding for causal LMs.

The pass marks the decode stage for speculation; the work is a third captured graph, the verify
step (``tcompile/runtime/verify.py``: the decode step widened to T = k + 1 tokens with a tree
mask), and a loop in the runtime (``tcompile/runtime/speculative.py``) that drafts, verifies,
accepts and rolls back. The options choose the drafter (``prompt_lookup``, ``token_recycling``,
``draft_model``, ``layer_skip``), the number of candidates k and the acceptance rule used when
sampling (greedy decoding always accepts by argmax, so its output equals plain greedy).

Papers: Leviathan et al. (ICML 2023) and Chen et al. (2023) for speculative sampling; Saxena's
prompt lookup decoding; Luo et al., Token Recycling (ACL 2025); Kim et al., BiLD (NeurIPS 2023);
Zhang et al., Draft & Verify (ACL 2024); Jang et al., LANTERN (ICLR 2025).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext, PassSkipped
from tcompile.registry import register_pass

DRAFTERS = ("prompt_lookup", "token_recycling", "draft_model", "layer_skip")
ACCEPTANCE = ("greedy", "sample", "lantern")
MAX_K = 64


@dataclass(frozen=True)
class SpeculativeOptions:
    """Drafter, candidates per step and acceptance rule, plus each drafter's own options."""

    drafter: str = "prompt_lookup"
    k: int = 8                      # candidates per step (the depth of a tree draft)
    acceptance: str = "sample"      # with do_sample=True: "sample" (lossless) | "lantern" (lossy);
                                    # "greedy": the runtime only decodes greedily
    max_ngram: int = 3              # prompt_lookup: longest n-gram matched
    min_ngram: int = 1              # prompt_lookup: shortest n-gram matched
    branches: int = 1               # prompt_lookup: distinct matches merged into a draft tree
    top_k: int = 8                  # token_recycling: successors kept per token (adjacency width)
    tree_nodes: int = 16            # token_recycling: candidate nodes of the draft tree (depth ≤ k)
    draft: Any = None               # draft_model: a smaller causal LM with the same vocabulary
    fallback: float = 0.5           # draft_model (BiLD): the draft stops when its top-1 prob < fallback
    skip: tuple[int, ...] | None = None   # layer_skip: layers skipped; None: chosen on calibration text
    skip_ratio: float = 0.5         # layer_skip: largest fraction of layers the search may skip
    delta: float = 0.1              # lantern: total-variation bound per token, in [0, 1]
    neighbours: int = 8             # lantern: nearest tokens (input embeddings, L2) a draft may absorb

    def __post_init__(self) -> None:
        name = "SpeculativeOptions"
        if self.drafter not in DRAFTERS:
            raise PassOptionError(f"{name}: drafter={self.drafter!r} is not one of {DRAFTERS}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= MAX_K:
            raise PassOptionError(f"{name}: k={self.k!r} must be an integer in [1, {MAX_K}] (the candidates "
                                  "drafted per step; k=4..10 suits most drafters)")
        if self.acceptance not in ACCEPTANCE:
            raise PassOptionError(f"{name}: acceptance={self.acceptance!r} must be one of {ACCEPTANCE}")
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and 1 <= self.min_ngram
                <= self.max_ngram):
            raise PassOptionError(f"{name}: need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram!r}, "
                                  f"max_ngram={self.max_ngram!r}")
        if not isinstance(self.branches, int) or not 1 <= self.branches <= 16:
            raise PassOptionError(f"{name}: branches={self.branches!r} must be an integer in [1, 16]")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 64:
            raise PassOptionError(f"{name}: top_k={self.top_k!r} must be an integer in [1, 64]")
        if not isinstance(self.tree_nodes, int) or not 1 <= self.tree_nodes <= 255:
            raise PassOptionError(f"{name}: tree_nodes={self.tree_nodes!r} must be an integer in [1, 255]")
        if not 0.0 <= self.fallback <= 1.0:
            raise PassOptionError(f"{name}: fallback={self.fallback!r} must lie in [0, 1] (BiLD's confidence "
                                  "threshold; 0 drafts all k tokens)")
        if not 0.0 < self.skip_ratio < 1.0:
            raise PassOptionError(f"{name}: skip_ratio={self.skip_ratio!r} must lie in (0, 1)")
        if self.skip is not None and (not all(isinstance(i, int) and i >= 0 for i in self.skip) or not self.skip):
            raise PassOptionError(f"{name}: skip={self.skip!r} must be a non-empty tuple of layer indices")
        if not 0.0 <= self.delta <= 1.0:
            raise PassOptionError(f"{name}: delta={self.delta!r} must lie in [0, 1] (LANTERN's total-variation "
                                  "bound; 0 is exact speculative sampling)")
        if not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise PassOptionError(f"{name}: neighbours={self.neighbours!r} must be a positive integer")
        if self.drafter == "draft_model" and self.draft is None:
            raise PassOptionError(f"{name}: drafter='draft_model' needs draft=<a smaller causal LM with the same "
                                  "tokenizer> (pass SpeculativeOptions(drafter='draft_model', draft=model))")

    @property
    def lossy(self) -> bool:
        return self.acceptance == "lantern" and self.delta > 0


@register_pass("speculative", options=SpeculativeOptions, family="speculative", exact=True)
def speculative(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Speculative decoding: a drafter proposes k tokens, a verify graph scores them in one call."""
    stage = ctx.program.info.get("lm_stage")
    if stage is None:
        raise PassSkipped("speculative decoding applies to causal LMs (prefill/decode graphs); this graph is "
                          "not one (optimize a causal LM, e.g. LlamaForCausalLM, to use it)")
    o: SpeculativeOptions = ctx.options
    ctx.stats.update(stage=stage, drafter=o.drafter, k=o.k, acceptance=o.acceptance, lossy=o.lossy,
                     runtime="SpeculativeRuntime drafts and verifies with the captured verify graph")
    return PassResult(gm, False)
