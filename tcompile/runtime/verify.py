"""The verify step of speculative decoding: score T = k + 1 tokens per row in one call.

``VerifyStep`` is the decode step widened from one new token to T: it takes the T tokens of a
draft (the last emitted token followed by k candidates, or a tree of candidates in BFS order),
their positions, an attention mask [B, T, S] saying which cache slots each of the T queries may
read (the valid entries of the cache, plus the draft's own slots that are its ancestors: causal
for a chain, a tree mask for a tree — SpecInfer/Medusa tree attention), and the slots [B, L, Hkv,
T] where the T new entries are written. It returns logits [B, T, V] and the cache. Since every
entry carries its own RoPE position and validity, rejected entries are rolled back by
bookkeeping alone (their slots are marked invalid and written over by the next step).

The step is exported once with a dynamic token dim, so one graph serves every k and every tree.
Papers: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding" (ICML 2023);
Miao et al., "SpecInfer" (ASPLOS 2024) for tree attention.
"""
from __future__ import annotations

import torch

from tcompile.inputs import batch_dim
from tcompile.runtime.lm_capture import (LMSpec, _additive, _cache_kwarg, _export, _flat_cache, cache_slots_dim,
                                         lm_spec, slot_cache)

MAX_DRAFT = 256   # the largest T the verify graph is exported for


class VerifyStep(torch.nn.Module):
    """(input_ids [B, T], position_ids [B, T], attend [B, T, S] bool, slot [B, L, Hkv, T] long,
    (K0, V0, ...) [B, Hkv, S, d]) → (logits [B, T, V], K0', V0', ...): the T tokens' entries are
    written at ``slot`` and query t reads the slots ``attend[:, t]`` (which include its own)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor,
                slot: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        mask = _additive(attend, self.dtype)[:, None]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_kwarg: slot_cache(kv, slot)})
        return (out.logits, *_flat_cache(out.past_key_values))


def verify_dynamic_shapes(n_kv: int) -> tuple:
    """Dynamic dims of (ids, positions, attend, slot, kv): batch, draft tokens T and cache slots."""
    batch, slots = batch_dim(), cache_slots_dim()
    tokens = torch.export.Dim("draft_tokens", min=1, max=MAX_DRAFT)
    return ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch, 1: tokens, 2: slots},
            {0: batch, 3: tokens}, tuple({0: batch, 2: slots} for _ in range(n_kv)))


def verify_example_args(spec: LMSpec, device: torch.device | str = "cpu", batch: int = 2, cached: int = 6,
                        tokens: int = 3) -> tuple:
    """Example inputs of the verify step: ``batch`` rows (row 1, if any, left padded by two entries),
    ``cached`` entries in the cache and a causal draft of ``tokens`` written after them.
    Engines are built from examples whose batch and token count differ from every other dim of
    the step (layers, KV heads), so the compiler cannot tie them together (see
    :func:`tcompile.runtime.lm_lowering._rebatch`)."""
    ids = torch.randint(0, spec.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    kv = tuple(torch.zeros(batch, spec.kv_heads, cached + tokens, spec.head_dim, dtype=spec.dtype, device=device)
               for _ in range(2 * spec.num_layers))
    pos = torch.arange(cached, cached + tokens, device=device).expand(batch, tokens).contiguous()
    attend = torch.ones(batch, tokens, cached + tokens, dtype=torch.bool, device=device)
    attend[:, :, cached:] = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    if batch > 1:
        attend[1, :, :2] = False   # a left-padded row
    slot = (cached + torch.arange(tokens, device=device)).expand(batch, spec.num_layers, spec.kv_heads,
                                                                 tokens).contiguous()
    return (ids, pos, attend, slot, kv)


def capture_verify(model: torch.nn.Module) -> tuple[torch.fx.GraphModule, tuple]:
    """Export ``VerifyStep`` of ``model`` (dynamic batch, draft length and cache slots).
    Returns the graph module and its example args."""
    spec = lm_spec(model)
    args = verify_example_args(spec, next(model.parameters()).device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            ep = _export(VerifyStep(model, spec.dtype), args, verify_dynamic_shapes(len(args[4])))
    finally:
        model.train(was_training)
    return ep.module(), args
