"""Pass ``token_merging``: ToMe / PiToMe token merging between attention and MLP in every block.

Runs on encoders (ViT, BERT/MiniLM) captured by tcompile. At each scheduled layer it merges r
tokens of the residual stream (keys as the similarity metric, as ToMe; or the hidden states,
which keep sentence embeddings far closer on MiniLM: bench/RESULTS.md), tracks sizes, biases later
attention by log(size) (proportional attention), keeps leading special tokens (CLS) unmerged,
and restores per-token outputs to the original positions (``output=unmerge``), which also makes
size-weighted mean pooling exact with respect to the merged states.

Papers: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023); Tran et al.,
"Accelerating Transformers with Spectrum-Preserving Token Merging" (NeurIPS 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.analysis.attention import AttentionAnalysis
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext
from tcompile.passes.merge_ops import pitome_margin, pitome_merge, tome_merge
from tcompile.passes.token_reduction import REDUCER_FUNCTIONS, ReducerContext, TokenReducer, apply_token_reduction
from tcompile.registry import register_pass

REDUCER_FUNCTIONS.update({tome_merge, pitome_merge})
DEFAULT_R = 8


@dataclass(frozen=True)
class TokenMergingOptions:
    r: int | None = None                   # tokens merged per layer (default 8 when nothing else is set)
    ratio: float | None = None             # or: fraction of the current mergeable tokens merged per layer
    schedule: str = "constant"             # "constant" | "decreasing" (ToMe's inflect=-1: 2r → 0)
    layers: tuple[int, ...] | None = None  # or: an explicit r per layer (missing layers merge nothing)
    method: str = "tome"                   # "tome" | "pitome"
    metric: str = "keys"                   # similarity features: "keys" (ToMe's default) | "hidden" (residual stream)
    prop_attn: bool = True                 # proportional attention (log-size bias)
    output: str = "unmerge"                # per-token outputs: "unmerge" to original positions | "merged"
    protect: int | None = None             # leading tokens never merged; None: detected (CLS)

    def __post_init__(self) -> None:
        given = [n for n in ("r", "ratio", "layers") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PassOptionError(f"token_merging: set only one of r, ratio, layers (got {', '.join(given)})")
        if not given:
            object.__setattr__(self, "r", DEFAULT_R)
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0):
            raise PassOptionError(f"token_merging: r={self.r!r} must be a non-negative integer")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio <= 0.5):
            raise PassOptionError(f"token_merging: ratio={self.ratio!r} must lie in [0, 0.5] (at most half "
                                  "the tokens can merge in one bipartite step)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if any(not isinstance(v, int) or v < 0 for v in self.layers):
                raise PassOptionError(f"token_merging: layers={self.layers!r} must be non-negative integers")
        for name, allowed in (("schedule", ("constant", "decreasing")), ("method", ("tome", "pitome")),
                              ("metric", ("keys", "hidden")),
                              ("output", ("unmerge", "merged"))):
            if getattr(self, name) not in allowed:
                raise PassOptionError(f"token_merging: {name}={getattr(self, name)!r} must be one of {allowed}")
        if self.protect is not None and (not isinstance(self.protect, int) or self.protect < 0):
            raise PassOptionError(f"token_merging: protect={self.protect!r} must be a non-negative integer")


class _Merger(TokenReducer):
    def __init__(self, options: TokenMergingOptions) -> None:
        self.options = options
        self.proportional_attention = options.prop_attn

    def removals(self, analysis: AttentionAnalysis, protect: int) -> list[int]:
        o, num = self.options, len(analysis.sites)
        n = analysis.sites[0].q_tokens
        if o.layers is not None:
            if len(o.layers) > num:
                raise PassOptionError(f"token_merging: layers has {len(o.layers)} entries but the model has "
                                      f"{num} attention layers")
            wanted = list(o.layers) + [0] * (num - len(o.layers))
        elif o.ratio is not None:
            wanted = []
            for _ in range(num):
                wanted.append(int(o.ratio * (n - protect)))
                n -= wanted[-1]
            n = analysis.sites[0].q_tokens
        elif o.schedule == "decreasing":
            wanted = [int(round(2 * o.r * (1 - i / max(num - 1, 1)))) for i in range(num)]
        else:
            wanted = [o.r] * num
        first_cap = (n - protect) // 2
        if max(wanted) > first_cap and wanted[0] > first_cap:
            raise PassOptionError(
                f"token_merging: r={max(wanted)} exceeds what {n} tokens allow ({n} tokens, {protect} protected: "
                f"at most {first_cap} can merge in one layer); use r<={first_cap}")
        out = []
        for w in wanted:
            r = min(w, (n - protect) // 2)  # ToMe's 50% cap per layer
            out.append(r)
            n -= r
        return out

    def emit(self, rc: ReducerContext, remove: int) -> torch.fx.Node:
        metric = rc.site.k if self.options.metric == "keys" else rc.x
        if self.options.method == "pitome":
            return rc.graph.call_function(pitome_merge, (rc.x, metric, rc.sizes, rc.src_map, remove, rc.protect,
                                                         pitome_margin(rc.layer, rc.num_layers)))
        return rc.graph.call_function(tome_merge, (rc.x, metric, rc.sizes, rc.src_map, remove, rc.protect))


@register_pass("token_merging", options=TokenMergingOptions, family="token_reduction")
def token_merging(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Merge similar tokens after attention (ToMe / PiToMe), with size tracking and proportional attention."""
    opts: TokenMergingOptions = ctx.options
    ctx.stats["method"] = opts.method
    return apply_token_reduction(gm, ctx, _Merger(opts), opts.output, opts.protect)
