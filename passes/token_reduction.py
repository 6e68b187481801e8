"""The token-reduction family base: insert a static-count reducer after attention residuals.

Token merging and token pruning share everything but the reducer itself: where it goes (after
``x + Attn(x)``, before the MLP, as ToMe and EViT place it), the per-token state it threads
(sizes, source map; see ``token_state``), the attention bias that later layers need
(proportional attention, padding), restoring per-token outputs, and rewriting the token counts
that ``torch.export`` baked into ``view``/``reshape``/``expand`` sizes. A family member only says
how many tokens go at each site and how to emit its reducer call (``TokenReducer``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from tcompile.analysis.attention import AttentionAnalysis, AttentionSite, per_token_outputs, require_attention
from tcompile.analysis.graph_utils import aten
from tcompile.pass_manager import PassContext, PassSkipped
from tcompile.passes.token_state import init_token_state, size_bias, unmerge

# Ops whose list argument is a size that torch.export baked in as ints.
_SIZED_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
              aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default}
# Every function a token reducer inserts; a graph holding one is already reduced.
REDUCER_FUNCTIONS: set[Callable[..., Any]] = {init_token_state, unmerge}


@dataclass
class ReducerContext:
    """What a reducer needs to emit its call at one site."""

    graph: torch.fx.Graph
    site: AttentionSite
    layer: int
    num_layers: int
    x: torch.fx.Node          # the residual stream after attention
    sizes: torch.fx.Node
    src_map: torch.fx.Node | None
    bias: torch.fx.Node | None   # the attention bias this site used (None: its original mask)
    protect: int
    tokens: int                  # tokens entering this site


class TokenReducer:
    """Family base. Subclasses return per-site removals and emit one call per reducing site."""

    proportional_attention: bool = False

    def removals(self, analysis: AttentionAnalysis, protect: int) -> list[int]:
        raise NotImplementedError

    def emit(self, rc: ReducerContext, remove: int) -> torch.fx.Node:
        """Insert the reducer call (returning ``(x, sizes, src_map)``) at the graph's insert point."""
        raise NotImplementedError

    def restores_outputs(self) -> str | None:
        """None when per-token outputs can be restored, else the reason they cannot."""
        return None


def apply_token_reduction(gm: torch.fx.GraphModule, ctx: PassContext, reducer: TokenReducer,
                          output: str, protect: int | None) -> PassResult:
    program = ctx.program
    analysis = require_attention(program)
    sites = analysis.sites
    if any(n.op == "call_function" and n.target in REDUCER_FUNCTIONS for n in gm.graph.nodes):
        raise PassSkipped("the graph already holds a token reduction; tcompile applies one token-reduction "
                          "pass per graph (use one pass with a per-layer schedule)")
    n0 = sites[0].q_tokens
    if any(s.q_tokens != n0 or s.kv_tokens != n0 for s in sites):
        raise PassSkipped(f"attention sites see different token counts ({[s.q_tokens for s in sites]}); "
                          "token reduction needs an encoder whose layers all see the same tokens")
    protect = analysis.leading_special if protect is None else protect
    removals = reducer.removals(analysis, protect)
    if sum(removals) == 0:
        raise PassSkipped("the schedule removes no token at any layer (r=0 or keep=1.0)")
    missing = [s.index for s, r in zip(sites, removals) if r > 0 and s.residual is None]
    if missing:
        raise PassSkipped(f"could not find the residual stream after attention at site(s) {missing}")
    per_token = per_token_outputs(program)
    restore = bool(per_token) and output == "unmerge"
    if restore and reducer.restores_outputs():
        raise PassSkipped(f"the model returns per-token outputs and {reducer.restores_outputs()}; "
                          "set output=merged to return the reduced tokens instead")

    graph = gm.graph
    first = next(i for i, r in enumerate(removals) if r > 0)
    sizes = src_map = bias = None
    counts: dict[torch.fx.Node, int] = {}
    n_cur = n0
    for i in range(first, len(sites)):
        site = sites[i]
        if i > first:
            bias = _rewire_mask(graph, site, sizes, reducer.proportional_attention, sites[first].mask is not None)
        if removals[i] <= 0:
            continue
        x = site.residual
        with graph.inserting_after(x):
            new_nodes: list[torch.fx.Node] = []
            if sizes is None:
                init = graph.call_function(init_token_state, (x, sites[first].mask, restore))
                sizes, src_map = (graph.call_function(operator.getitem, (init, j)) for j in range(2))
                new_nodes += [init, sizes, src_map]
            call = reducer.emit(ReducerContext(graph, site, i, len(sites), x, sizes, src_map if restore else None,
                                               bias, protect, n_cur), removals[i])
            x_new, sizes, src_map_new = (graph.call_function(operator.getitem, (call, j)) for j in range(3))
            new_nodes += [call, x_new, sizes, src_map_new]
        _order_after(x, new_nodes)
        src_map = src_map_new if restore else src_map
        x.replace_all_uses_with(x_new, delete_user_cb=lambda u, keep=set(new_nodes): u not in keep)
        n_cur -= removals[i]
        counts[x_new] = counts[sizes] = n_cur
        ctx.stats.setdefault("reductions", []).append({"layer": i, "removed": removals[i], "tokens": n_cur})
    if restore:
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        for node in per_token:
            with graph.inserting_before(out):
                restored = graph.call_function(unmerge, (node, src_map))
            out.replace_input_with(node, restored)
    _retokenize(graph, counts, n0)
    graph.eliminate_dead_code()
    gm.recompile()
    ctx.stats.update(tokens_in=n0, tokens_out=n_cur, protected=protect, per_token_outputs=len(per_token),
                     output_mode=("unmerge" if restore else ("merged" if per_token else "none")))
    return PassResult(gm, True)


def _order_after(anchor: torch.fx.Node, nodes: list[torch.fx.Node]) -> None:
    """Place ``nodes`` right after ``anchor`` in the given order (inserting_after reverses them)."""
    prev = anchor
    for n in nodes:
        prev.append(n)
        prev = n


def _rewire_mask(graph: torch.fx.Graph, site: AttentionSite, sizes: torch.fx.Node, proportional: bool,
                 had_mask: bool) -> torch.fx.Node | None:
    """Give a site after a reduction the bias its reduced tokens need (or no mask at all)."""
    need = proportional or had_mask
    anchor = site.mask_add if site.form == "eager" and site.mask_add is not None else site.attn
    bias = None
    if need:
        with graph.inserting_before(anchor):
            bias = graph.call_function(size_bias, (sizes, proportional))
    if site.form == "sdpa":
        if len(site.attn.args) > 3:
            site.attn.update_arg(3, bias)
        else:
            site.attn.update_kwarg("attn_mask", bias)
    elif site.mask_add is not None:
        if bias is None:
            site.mask_add.replace_all_uses_with(site.logits)
        else:
            site.mask_add.replace_input_with(site.mask, bias)
    elif bias is not None:  # eager attention without a mask: add the bias to the softmax input
        with graph.inserting_before(site.attn):
            add = graph.call_function(aten.add.Tensor, (site.attn.args[0], bias))
        site.attn.update_arg(0, add)
    return bias


def _retokenize(graph: torch.fx.Graph, counts: dict[torch.fx.Node, int], n0: int) -> None:
    """Propagate each node's token count downstream of the reducers and rewrite baked sizes."""
    for node in graph.nodes:
        if node in counts or node.op != "call_function" or node.target in REDUCER_FUNCTIONS:
            continue
        seen = {counts[a] for a in node.all_input_nodes if a in counts}
        if not seen:
            continue
        if len(seen) > 1:
            raise RuntimeError(f"node {node.name} mixes token counts {sorted(seen)}; the token rewrite cannot "
                               "tell which count it needs")
        n = seen.pop()
        counts[node] = n
        if node.target in _SIZED_OPS and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)):
            node.update_arg(1, [n if (isinstance(d, int) and d == n0) else d for d in node.args[1]])
