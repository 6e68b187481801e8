"""Graph passes tcompile hands to Inductor for CPU inference (``torch._inductor.config`` hooks).

``GeluOutsideGemm``: with freezing, Inductor fuses ``linear -> GELU`` into one oneDNN GEMM whose
epilogue computes the exact (erf) GELU. On the 2-core AVX2 build machine that epilogue is slower
than the GEMM without it followed by a separate vectorised GELU: the 12 fc1 GEMMs of ViT-B/16 with
``token_merging{r=16}`` at batch 8 took 511 ms fused against 428 ms unfused (``/tmp`` one-off,
2026-11-29; the whole model ran 1.14x eager against 1.07x with the fusion, in one /tmp run).
Inductor has no switch for this fusion, so the pass rewrites the decomposed GELU
``0.5*y*(1 + erf(y/sqrt(2)))`` as ``y*(0.5*erf(y/sqrt(2)) + 0.5)``: the same function (the results
agree to float rounding) in a form oneDNN's fusion pattern does not match. It runs before Inductor's post-grad patterns
(``post_grad_custom_pre_pass``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from tcompile.analysis.graph_utils import is_call

aten = torch.ops.aten


def _gelu_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """``y`` if ``node`` is ``mul(mul(y, 0.5), add(erf(mul(y, 1/sqrt(2))), 1))``, else None."""
    if not is_call(node, (aten.mul.Tensor,)) or len(node.args) != 2:
        return None
    half, plus = node.args
    if not (is_call(half, (aten.mul.Tensor,)) and half.args[1] == 0.5
            and is_call(plus, (aten.add.Tensor,)) and plus.args[1] == 1):
        return None
    erf = plus.args[0]
    if not is_call(erf, (aten.erf.default,)):
        return None
    scaled, y = erf.args[0], half.args[0]
    if not (is_call(scaled, (aten.mul.Tensor,)) and scaled.args[0] is y and isinstance(scaled.args[1], float)
            and math.isclose(scaled.args[1], math.sqrt(0.5), rel_tol=1e-12)):
        return None
    return y


class GeluOutsideGemm(CustomGraphPass):
    """Rewrite each exact GELU so Inductor keeps it out of oneDNN's GEMM epilogue (module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            y = _gelu_input(node)
            if y is None:
                continue
            half, plus = node.args
            erf = plus.args[0]
            with graph.inserting_before(node):
                scaled = graph.call_function(aten.mul.Tensor, (erf, 0.5))
                shifted = graph.call_function(aten.add.Tensor, (scaled, 0.5))
                out = graph.call_function(aten.mul.Tensor, (y, shifted))
            for new in (scaled, shifted):
                new.meta.update(erf.meta)
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            for dead in (plus, half):
                if not dead.users:
                    graph.erase_node(dead)

    def uuid(self) -> bytes:
        """Inductor's FX-graph cache key for this pass: the hash of this file."""
        return get_hash_for_files((str(Path(__file__)),))
