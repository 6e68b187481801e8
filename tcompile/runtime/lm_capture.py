"""Capture a causal LM as two graphs, prefill and decode, with the KV cache as explicit tensors.

tcompile owns the cache layout: per layer K and V of shape [batch, kv_heads, capacity, head_dim]
(keys RoPE-rotated at their original positions, as transformers caches them); the runtime keeps
the original position of every entry beside them (-1: an empty slot or padding). The masks are
built inside the captured steps from entry validity alone, so entries may be evicted in any
pattern, and a new token's position is the number of real tokens seen so far, never the cache
length. transformers' cache object is created inside the traced step and never crosses the graph
boundary, so both graphs are plain tensor programs that export anywhere (ONNX included).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from tcompile.analysis.shapes import propagate_shapes
from tcompile.canonicalize import native_gqa
from tcompile.errors import CaptureError
from tcompile.inputs import batch_dim
from tcompile.program import Program


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A transformers model that generates text left to right (decoder-only)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return (config is not None and callable(can_generate) and bool(can_generate())
            and not getattr(config, "is_encoder_decoder", False))


@dataclass(frozen=True)
class LMSpec:
    """Facts about a causal LM that the runtime and the KV passes need."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    dtype: torch.dtype

    def cache_bytes(self, batch: int, entries: int) -> int:
        """Bytes of K and V for ``entries`` cached tokens per layer and KV head."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * batch * self.kv_heads * entries * self.head_dim * item


@dataclass
class LMProgram:
    """A causal LM as a prefill Program and a decode Program sharing parameters."""

    prefill: Program
    decode: Program
    spec: LMSpec
    model_name: str
    info: dict[str, Any] = field(default_factory=dict)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's minimum where not (finite: no NaN on empty rows)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"   # transformers 5.x renames it to cache


def _flat_cache(cache: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


class PrefillStep(torch.nn.Module):
    """(input_ids [B, N], attention_mask [B, N], left padded) → (last logits [B, V], K0, V0, K1, ...)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.cache_kwarg = _cache_kwarg(model)
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        n = input_ids.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        mask = _additive(causal[None] & attention_mask.bool()[:, None, :], self.dtype)[:, None]
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kwarg: DynamicCache()}, **extra)
        return (out.logits[:, -1], *_flat_cache(out.past_key_values))


class DecodeStep(torch.nn.Module):
    """(input_ids [B, 1], position_ids [B, 1], cache_valid [B, C] bool, (K0, V0, ...) [B, Hkv, C, d])
    → (logits [B, V], K0', V0', ...) with the new token's entry appended at slot C."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_valid: torch.Tensor,
                kv: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        valid = torch.cat([cache_valid, torch.ones_like(cache_valid[:, :1])], dim=1)
        mask = _additive(valid, self.dtype)[:, None, None]
        cache = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)])
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_kwarg: cache})
        return (out.logits[:, -1], *_flat_cache(out.past_key_values))


def lm_spec(model: torch.nn.Module) -> LMSpec:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    eos_ids = tuple(e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    param = next(model.parameters())
    return LMSpec(num_layers=config.num_hidden_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  vocab_size=config.vocab_size,
                  max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
                  eos_token_ids=eos_ids, pad_token_id=pad, dtype=param.dtype)


def capture_lm(model: torch.nn.Module, name: str | None = None) -> LMProgram:
    """Export the prefill and decode steps of ``model`` (dynamic batch, prompt and cache length)."""
    if not is_causal_lm(model):
        raise CaptureError(f"{type(model).__name__} is not a causal LM (no generate(), or an encoder-decoder); "
                           "prefill/decode capture needs a decoder-only transformers model such as "
                           "LlamaForCausalLM or GPT2LMHeadModel")
    spec = lm_spec(model)
    device = next(model.parameters()).device
    ids = torch.randint(0, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so padding is part of the traced behaviour
    batch, tokens, cache = batch_dim(), torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            prefill_ep = _export(PrefillStep(model, spec.dtype), (ids, mask),
                                 ({0: batch, 1: tokens}, {0: batch, 1: tokens}))
            outs = prefill_ep.module()(ids, mask)
            kv = tuple(outs[1:])
            dec_args = (ids[:, -1:], mask.sum(1, keepdim=True), mask.bool(), kv)
            decode_ep = _export(DecodeStep(model, spec.dtype), dec_args,
                                ({0: batch}, {0: batch}, {0: batch, 1: cache}, tuple({0: batch, 2: cache} for _ in kv)))
    finally:
        model.train(was_training)
    name = name or type(model).__name__
    prefill = Program(prefill_ep.module(), (ids, mask), {}, name + ".prefill", info={"lm_stage": "prefill"})
    decode = Program(decode_ep.module(), dec_args, {}, name + ".decode", info={"lm_stage": "decode"})
    for program in (prefill, decode):
        program.info["native_gqa_sites"] = native_gqa(program.gm)
        propagate_shapes(program)
    return LMProgram(prefill, decode, spec, name)


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many types; the user needs the cause and a next step
        raise CaptureError(
            f"torch.export could not capture the {type(module).__name__} of {type(module.model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. tcompile captures "
            "transformers causal LMs that accept position_ids, a 4D attention mask and a DynamicCache"
        ) from exc
