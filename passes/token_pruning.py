"""Pass ``token_pruning``: keep the most-attended tokens after attention at chosen layers (EViT).

Score: attention from the CLS token averaged over heads (EViT, VTC-CLS), or the mean attention a
token receives when the model has no CLS token. Static keep counts (topk + gather), optional
fusion of the pruned tokens into one extra token (EViT's "inattentive token fusion").
Defaults follow EViT: keep rate 0.7 at layers 3, 6, 9 of 12 (scaled to the model's depth).

Paper: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (ICLR 2022), reference ``youweiliang/evit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.analysis.attention import AttentionAnalysis
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext
from tcompile.passes.prune_ops import attention_probs, importance, prune_tokens
from tcompile.passes.token_reduction import REDUCER_FUNCTIONS, ReducerContext, TokenReducer, apply_token_reduction
from tcompile.registry import register_pass


def evit_prune(x: torch.Tensor, sizes: torch.Tensor, src_map: torch.Tensor | None, keep: int, protect: int,
               fuse: bool, probs: torch.Tensor | None = None, q: torch.Tensor | None = None,
               k: torch.Tensor | None = None, mask: torch.Tensor | None = None, scale: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score tokens from the site's attention (given, or recomputed from q/k for fused SDPA) and prune."""
    if probs is None:
        probs = attention_probs(q, k, mask, scale, rows=1 if protect > 0 else None)
    return prune_tokens(x, importance(probs, protect), sizes, src_map, keep, protect, fuse)


REDUCER_FUNCTIONS.add(evit_prune)


@dataclass(frozen=True)
class TokenPruningOptions:
    keep: float | tuple[float, ...] = 0.7       # fraction of prunable tokens kept at each pruning layer
    layers: tuple[int, ...] | None = None       # pruning layers; None: EViT's 3,6,9 of 12 scaled to depth
    fuse: bool = False                          # fuse pruned tokens into one extra token
    output: str = "unmerge"                     # per-token outputs: "unmerge" (needs fuse) | "merged"
    protect: int | None = None                  # leading tokens never pruned; None: detected (CLS)

    def __post_init__(self) -> None:
        keeps = self.keep if isinstance(self.keep, (tuple, list)) else (self.keep,)
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(self.keep))
        if not keeps or any(not isinstance(v, (int, float)) or not 0.0 < v <= 1.0 for v in keeps):
            raise PassOptionError(f"token_pruning: keep={self.keep!r} must be fraction(s) in (0, 1]")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or any(not isinstance(v, int) or v < 0 for v in self.layers):
                raise PassOptionError(f"token_pruning: layers={self.layers!r} must be non-negative layer indices")
            if isinstance(self.keep, tuple) and len(self.keep) != len(self.layers):
                raise PassOptionError("token_pruning: give one keep ratio per pruning layer "
                                      f"({len(self.keep)} ratios for {len(self.layers)} layers)")
        if self.output not in ("unmerge", "merged"):
            raise PassOptionError(f"token_pruning: output={self.output!r} must be 'unmerge' or 'merged'")
        if self.protect is not None and (not isinstance(self.protect, int) or self.protect < 0):
            raise PassOptionError(f"token_pruning: protect={self.protect!r} must be a non-negative integer")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """EViT prunes at blocks 3, 6, 9 of 12: a quarter, half and three quarters of the depth."""
    return tuple(sorted({max(0, min(num_layers - 1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)}))


class _Pruner(TokenReducer):
    def __init__(self, options: TokenPruningOptions) -> None:
        self.options = options

    def _plan(self, num: int) -> dict[int, float]:
        layers = self.options.layers if self.options.layers is not None else default_layers(num)
        if max(layers) >= num:
            raise PassOptionError(f"token_pruning: layer {max(layers)} does not exist; the model has {num} layers")
        keeps = self.options.keep if isinstance(self.options.keep, tuple) else (self.options.keep,) * len(layers)
        if len(keeps) != len(layers):
            raise PassOptionError(f"token_pruning: {len(keeps)} keep ratios for {len(layers)} pruning layers")
        return dict(zip(layers, keeps))

    def removals(self, analysis: AttentionAnalysis, protect: int) -> list[int]:
        plan, n = self._plan(len(analysis.sites)), analysis.sites[0].q_tokens
        out = []
        for i in range(len(analysis.sites)):
            removed = 0
            if i in plan:
                t = n - protect
                kept = math.ceil(plan[i] * t)
                removed = max(0, t - kept - (1 if self.options.fuse else 0))
            out.append(removed)
            n -= removed
        return out

    def emit(self, rc: ReducerContext, remove: int) -> torch.fx.Node:
        fuse = self.options.fuse
        keep = rc.tokens - rc.protect - remove - (1 if fuse else 0)
        args = (rc.x, rc.sizes, rc.src_map, keep, rc.protect, fuse)
        site = rc.site
        if site.form == "eager":
            return rc.graph.call_function(evit_prune, args, {"probs": site.attn})
        mask = rc.bias if rc.bias is not None else site.mask
        return rc.graph.call_function(evit_prune, args, {"q": site.q, "k": site.k, "mask": mask,
                                                         "scale": site.attn.kwargs.get("scale")})

    def restores_outputs(self) -> str | None:
        return None if self.options.fuse else "token_pruning without fuse=true drops tokens for good"


@register_pass("token_pruning", options=TokenPruningOptions, family="token_reduction")
def token_pruning(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Keep the top tokens by CLS attention (EViT), or by mean attention received without a CLS token."""
    opts: TokenPruningOptions = ctx.options
    return apply_token_reduction(gm, ctx, _Pruner(opts), opts.output, opts.protect)
