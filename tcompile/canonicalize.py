"""Canonicalisation applied at capture, to the baseline and the optimized graph alike.

transformers builds an attention mask even when nothing is masked: a ViT's SDPA receives an
all-True ``[B, 1, N, N]`` boolean mask assembled from ``arange`` and the batch size. It carries
no information, forces SDPA off its unmasked fast path, and pins the token count into the graph.
Masks that depend on the inputs only through their sizes are evaluated once; when they mask
nothing they are removed. Input-dependent masks (padding) are left alone.
"""
from __future__ import annotations

import logging

import torch

from tcompile.analysis.attention import analyze_attention
from tcompile.analysis.graph_utils import evaluate_constant
from tcompile.analysis.shapes import propagate_shapes
from tcompile.program import Program

log = logging.getLogger(__name__)


def _masks_nothing(value: object) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    if value.dtype == torch.bool:
        return bool(value.all())
    return bool((value == 0).all())


def drop_trivial_masks(program: Program) -> int:
    """Remove constant attention masks that mask nothing; return how many sites changed."""
    changed = 0
    flat = program.flat_inputs()
    for site in analyze_attention(program).sites:
        if site.mask is None or not _masks_nothing(evaluate_constant(program.gm, site.mask, flat)):
            continue
        if site.form == "sdpa":
            if len(site.attn.args) > 3:
                site.attn.update_arg(3, None)
            else:
                site.attn.update_kwarg("attn_mask", None)
        elif site.mask_add is not None and site.logits is not None:
            site.mask_add.replace_all_uses_with(site.logits)
        else:
            continue
        changed += 1
    if changed:
        program.gm.graph.eliminate_dead_code()
        program.gm.recompile()
        program.invalidate()
        propagate_shapes(program)
        log.info("removed %d constant attention mask(s) that masked nothing", changed)
    return changed


_REPEAT_KV = ("reshape", "expand", "slice", "unsqueeze")


def _unrepeated(node: torch.fx.Node) -> torch.fx.Node | None:
    """The [B, Hkv, N, d] tensor behind transformers' ``repeat_kv`` (unsqueeze → slice → expand →
    reshape), or None when ``node`` is not that pattern."""
    x = node
    for name in _REPEAT_KV:
        if not (isinstance(x, torch.fx.Node) and x.op == "call_function" and
                getattr(x.target, "__name__", "").split(".")[0] == name):
            return None
        x = x.args[0]
    return x if isinstance(x, torch.fx.Node) else None


def native_gqa(gm: torch.fx.GraphModule) -> int:
    """Feed SDPA the un-repeated K/V with ``enable_gqa=True`` instead of transformers' repeated copies.

    transformers repeats K and V to every query head before SDPA whenever an attention mask is
    given; tcompile's LM steps always give one, so each decode step would copy the whole cache
    (heads/kv_heads) times per layer. SDPA computes the same grouped attention natively.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or "scaled_dot_product_attention" not in str(node.target):
            continue
        k, v = _unrepeated(node.args[1]), _unrepeated(node.args[2])
        if k is None or v is None:
            continue
        node.update_arg(1, k)
        node.update_arg(2, v)
        node.update_kwarg("enable_gqa", True)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed
