"""Fidelity of an optimized model's outputs against a reference: the quality side of a budget."""
from __future__ import annotations

from typing import Any

import torch

from tcompile import _compat as compat


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    leaves = compat.tree_flatten(tree)[0]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _masked(t: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding positions of per-token outputs [B, N, ...]: their values carry no meaning."""
    if token_mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(token_mask.shape):
        return t
    return t * token_mask.reshape(*token_mask.shape, *([1] * (t.dim() - 2))).to(t.dtype)


def token_mask_of(kwargs: dict) -> torch.Tensor | None:
    """The [B, N] attention mask among a model's keyword inputs, if any: it marks padding."""
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def output_cosine(reference: Any, candidate: Any, token_mask: torch.Tensor | None = None) -> float:
    """Mean over examples of the cosine similarity of all float outputs concatenated per example.

    Outputs whose shape changed (per-token outputs under ``output=merged``) are left out.

    ``token_mask`` [B, N] (an attention mask) excludes padding positions of per-token outputs.
    """
    pairs = [(r, c) for r, c in zip(_float_leaves(reference), _float_leaves(candidate)) if r.shape == c.shape]
    if not pairs:  # e.g. output=merged changed every per-token output's length
        raise ValueError("no output of the optimized model has the reference's shape; cannot compare them")
    ref, cand = [p[0] for p in pairs], [p[1] for p in pairs]
    a = torch.cat([_masked(t, token_mask).reshape(t.shape[0], -1).double() for t in ref], dim=1)
    b = torch.cat([_masked(t, token_mask).reshape(t.shape[0], -1).double() for t in cand], dim=1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def max_abs_error(reference: Any, candidate: Any) -> float:
    ref, cand = _float_leaves(reference), _float_leaves(candidate)
    if len(ref) != len(cand):
        raise ValueError("outputs differ in structure; cannot compare them")
    return max((float((r.double() - c.double()).abs().max()) for r, c in zip(ref, cand) if r.numel()), default=0.0)
