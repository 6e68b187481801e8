"""Prompt-token pruning for long prompts: GemFilter.

GemFilter (Shi et al., "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs
with 1000x Input Token Reduction", 2024) runs only the first layers of the model over the whole
prompt, ranks the prompt tokens by how strongly the last token's query at filter layer r meets
their keys (raw RoPE-applied q·k summed over heads, average-pooled with kernel 5), keeps the top
``keep`` tokens in their original order, and then runs the full model on the kept tokens alone,
with fresh contiguous positions. Prefill cost falls from L layers over N tokens to r layers over
N plus L layers over ``keep``; the KV cache holds ``keep`` entries (KV eviction passes apply on
top).

The pass leaves the prefill graph as it is and derives the filter graph from it: a copy cut after
layer r's attention inputs, whose one output is the per-token score [B, N] (dead code — the later
layers and the LM head — removed). The runtime runs the filter, selects, then prefills.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.analysis.graph_utils import SDPA_OPS
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext, PassSkipped
from tcompile.registry import register_pass

METHODS = ("gemfilter",)


@dataclass(frozen=True)
class PromptPruningOptions:
    method: str = "gemfilter"
    layer: int = -1        # filter layer r (0-based); -1: 13/32 of the depth, GemFilter's choice for Llama-3.1-8B
    keep: int = 1024       # prompt tokens kept (GemFilter's default); shorter prompts are kept whole
    kernel: int = 5        # average pooling of the scores over neighbouring tokens (odd)
    tail: int = 0          # last prompt tokens always kept (e.g. the question); 0 as in the paper

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            extra = (" (FastV drops tokens after layer K, so later layers cache fewer entries than earlier "
                     "ones; tcompile's cache has one length per step for all layers, so FastV is not "
                     "available yet)") if self.method == "fastv" else ""
            raise PassOptionError(f"prompt_pruning: method={self.method!r} must be one of {METHODS}{extra}")
        if not isinstance(self.layer, int) or self.layer < -1:
            raise PassOptionError(f"prompt_pruning: layer={self.layer!r} must be a layer index ≥ 0 (or -1: automatic)")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise PassOptionError(f"prompt_pruning: keep={self.keep!r} must be a positive number of tokens")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise PassOptionError(f"prompt_pruning: kernel={self.kernel!r} must be a positive odd integer")
        if not isinstance(self.tail, int) or not 0 <= self.tail <= self.keep:
            raise PassOptionError(f"prompt_pruning: tail={self.tail!r} must lie in [0, keep={self.keep}]")

    def filter_layer(self, num_layers: int) -> int:
        if self.layer >= num_layers:
            raise PassOptionError(f"prompt_pruning: layer={self.layer} but the model has {num_layers} layers "
                                  f"(0..{num_layers - 1})")
        return self.layer if self.layer >= 0 else max(0, math.floor(num_layers * 13 / 32))


def gem_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ over query heads of the last query's raw logits q·k (no scale, no softmax): [B, N], float32.

    ``k`` has the KV heads (GQA: query head h reads KV head h // (H / Hkv)) or all query heads.
    """
    b, h, _, d = q.shape
    hk = k.shape[1]
    last = q[:, :, -1].float().reshape(b, hk, h // hk, d).sum(dim=2)          # [B, Hkv, d]: Σ over each group
    return torch.einsum("bhd,bhnd->bn", last, k.float())


def pooled_scores(scores: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average-pool the scores (zero padding counted, as GemFilter); padding positions get -inf."""
    scores = scores.masked_fill(mask == 0, 0.0)
    if kernel > 1:
        scores = F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=True)[:, 0]
    return scores.masked_fill(mask == 0, float("-inf"))


def select_tokens(ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, keep: int, tail: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept prompt: ids and mask [B, K] (left padded, K = min(keep, longest row)) and the kept
    original indices [B, K] (-1 for padding), in original order."""
    real = mask.sum(dim=1)
    width = int(min(keep, int(real.max())))
    n = ids.shape[1]
    ranked = scores.clone()
    if tail > 0:   # the last real tokens sit at the right end (left padding)
        ranked[:, n - tail:] = torch.where(mask[:, n - tail:] > 0, float("inf"), ranked[:, n - tail:])
    out_ids = torch.zeros(ids.shape[0], width, dtype=ids.dtype)
    out_mask = torch.zeros(ids.shape[0], width, dtype=mask.dtype)
    kept = torch.full((ids.shape[0], width), -1, dtype=torch.long)
    for row in range(ids.shape[0]):
        count = int(min(width, int(real[row])))
        idx = ranked[row].topk(count).indices.sort().values
        out_ids[row, width - count:] = ids[row, idx]
        out_mask[row, width - count:] = 1
        kept[row, width - count:] = idx
    return out_ids, out_mask, kept


def build_filter(gm: torch.fx.GraphModule, layer: int) -> torch.fx.GraphModule:
    """A copy of a prefill graph (sharing its parameters) that returns layer ``layer``'s GemFilter
    scores [B, N] and computes nothing after them."""
    graph = copy.deepcopy(gm.graph)
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_OPS]
    if layer >= len(sites):
        raise PassOptionError(f"prompt_pruning: filter layer {layer} but the prefill graph has {len(sites)} "
                              "attention sites")
    site = sites[layer]
    with graph.inserting_after(site):
        score = graph.call_function(gem_scores, (site.args[0], site.args[1]))
    output = next(n for n in graph.nodes if n.op == "output")
    graph._codegen = torch.fx.graph.CodeGen()      # plain positional inputs, a plain tuple out
    output.args = ((score,),)
    # Keep only what the score needs. fx's eliminate_dead_code keeps export's metadata asserts and
    # autograd-only detach_ calls, which would hold every later layer alive.
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)
    out = torch.fx.GraphModule(gm, graph)
    out.recompile()
    return out


@register_pass("prompt_pruning", options=PromptPruningOptions, family="prompt_pruning")
def prompt_pruning(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """GemFilter prompt pruning: early layers select the prompt tokens the full model then reads."""
    stage = ctx.program.info.get("lm_stage")
    if stage != "prefill":
        raise PassSkipped("prompt_pruning acts on the prefill step of a causal LM" if stage == "decode" else
                          "prompt_pruning prunes the prompts of causal LMs; this graph is not a prefill step")
    layers = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS)
    layer = ctx.options.filter_layer(layers)
    ctx.program.info["prompt_filter"] = build_filter(gm, layer)
    ctx.stats.update(method=ctx.options.method, filter_layer=layer, keep=ctx.options.keep)
    return PassResult(gm, True)
