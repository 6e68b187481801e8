"""Capture a causal LM as two graphs, prefill and decode, with the KV cache as explicit tensors.

tcompile owns the cache layout: per layer K and V of shape [batch, kv_heads, capacity, head_dim]
(keys RoPE-rotated at their original positions, as transformers caches them); the runtime keeps
the original position of every entry beside them (-1: an empty slot or padding). The masks are
built inside the captured steps from entry validity alone, so entries may be evicted in any
pattern, and a new token's position is the number of real tokens seen so far, never the cache
length. transformers' cache object is created inside the traced step and never crosses the graph
boundary, so both graphs are plain tensor programs that export anywhere (ONNX included).

The decode step writes the new token's K and V into a slot of the cache the runtime chooses (a
free slot, or the one its KV policy evicted) with a scatter, instead of transformers' concatenation:
a decode step then touches one entry of the cache, not all of it. The exported graph is
functional (the scatter returns a new tensor, so it exports to ONNX); ``inplace_cache_writes``
turns those scatters into in-place writes for the eager runtime, as vLLM and transformers'
StaticCache write their preallocated caches.
"""
from __future__ import annotations

import copy
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
    verify: Program | None = None      # the T-token verify step (speculative decoding), when captured


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


def slot_cache(kv: tuple[torch.Tensor, ...], slot: torch.Tensor) -> Any:
    """A transformers cache whose layer i writes the step's new entries at ``slot[:, i]``:
    [B, Hkv] for one token (the decode step), [B, Hkv, T] for T tokens (the verify step)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.is_initialized = keys, values, True
            self.index = index if index.dim() == 3 else index[:, :, None]     # [B, Hkv, T]
            self.device, self.dtype = keys.device, keys.dtype

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            index = self.index[..., None]
            self.keys = self.keys.scatter(2, index.expand(-1, -1, -1, self.keys.shape[-1]), key_states)
            self.values = self.values.scatter(2, index.expand(-1, -1, -1, self.values.shape[-1]), value_states)
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = [SlotLayer(kv[2 * i], kv[2 * i + 1], slot[:, i]) for i in range(len(kv) // 2)]
    return cache


class DecodeStep(torch.nn.Module):
    """(input_ids [B, 1], position_ids [B, 1], cache_valid [B, S] bool (the written slot included),
    slot [B, L, Hkv] long, (K0, V0, ...) [B, Hkv, S, d]) → (logits [B, V], K0', V0', ...) with the new
    token's entry written at ``slot`` of each KV head."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_valid: torch.Tensor,
                slot: torch.Tensor, kv: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        mask = _additive(cache_valid, self.dtype)[:, None, None]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_kwarg: slot_cache(kv, slot)})
        return (out.logits[:, -1], *_flat_cache(out.past_key_values))


def _reads_only_shape(node: torch.fx.Node) -> bool:
    """A use of a tensor that keeps no alias of its data: a size query, or export's input guards."""
    return node.target is torch.ops.aten.sym_size.int or (node.op == "call_module" and "guards" in str(node.target))


def inplace_cache_writes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a decode graph (sharing its parameters) whose cache scatters write in place.

    The exported decode step is functional: each layer's ``scatter`` of the new entry returns a
    new cache tensor, a copy of the whole cache per layer and step. Where the scatter's input is a
    graph input read by nothing else, writing in place is safe, and the step's cache outputs
    become its (updated) inputs. The functional graph stays as it is for export.
    """
    graph = copy.deepcopy(gm.graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        buf = node.args[0] if node.target is torch.ops.aten.scatter.src else None
        if buf is not None and buf.op == "placeholder" and all(_reads_only_shape(u) and order[u] < order[node]
                                                               for u in buf.users if u is not node):
            node.target = torch.ops.aten.scatter_.src
    out = torch.fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out


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


def capture_lm(model: torch.nn.Module, name: str | None = None, verify: bool = False) -> LMProgram:
    """Export the prefill and decode steps of ``model`` (dynamic batch, prompt and cache length),
    and with ``verify`` the verify step of speculative decoding (dynamic draft length too)."""
    if not is_causal_lm(model):
        raise CaptureError(f"{type(model).__name__} is not a causal LM (no generate(), or an encoder-decoder); "
                           "prefill/decode capture needs a decoder-only transformers model such as "
                           "LlamaForCausalLM or GPT2LMHeadModel")
    spec = lm_spec(model)
    device = next(model.parameters()).device
    ids = torch.randint(0, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, so padding is part of the traced behaviour
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            prefill_ep = _export(PrefillStep(model, spec.dtype), (ids, mask), prefill_dynamic_shapes())
            outs = prefill_ep.module()(ids, mask)
            kv = tuple(torch.cat([t, torch.zeros_like(t[:, :, :1])], dim=2) for t in outs[1:])  # one free slot
            slot = torch.full((ids.shape[0], spec.num_layers, spec.kv_heads), ids.shape[1], dtype=torch.long)
            valid = torch.cat([mask.bool(), torch.ones_like(mask[:, :1], dtype=torch.bool)], dim=1)
            dec_args = (ids[:, -1:], mask.sum(1, keepdim=True), valid, slot, kv)
            decode_ep = _export(DecodeStep(model, spec.dtype), dec_args, decode_dynamic_shapes(len(kv)))
    finally:
        model.train(was_training)
    name = name or type(model).__name__
    prefill = Program(prefill_ep.module(), (ids, mask), {}, name + ".prefill", info={"lm_stage": "prefill"})
    decode = Program(decode_ep.module(), dec_args, {}, name + ".decode", info={"lm_stage": "decode"})
    for program in (prefill, decode):
        program.info["native_gqa_sites"] = native_gqa(program.gm)
        propagate_shapes(program)
    out = LMProgram(prefill, decode, spec, name)
    if verify:
        from tcompile.runtime.verify import capture_verify
        gm, args = capture_verify(model)
        out.verify = Program(gm, args, {}, name + ".verify", info={"lm_stage": "verify"})
        out.verify.info["native_gqa_sites"] = native_gqa(gm)
    return out


def cache_slots_dim() -> Any:
    """The cache slots of the decode and verify steps (min 2: export specialises sizes 0 and 1)."""
    return torch.export.Dim("cache_slots", min=2)


def prefill_dynamic_shapes() -> tuple:
    """Dynamic dims of the prefill step's (input_ids, attention_mask): batch and prompt length."""
    batch, tokens = batch_dim(), torch.export.Dim.DYNAMIC
    return ({0: batch, 1: tokens}, {0: batch, 1: tokens})


def decode_dynamic_shapes(n_kv: int) -> tuple:
    """Dynamic dims of the decode step's (ids, positions, valid, slot, kv): batch and cache slots.

    The slots are one named dim shared by the mask and every K and V buffer: with a separate
    ``Dim.DYNAMIC`` per input, export left the V buffers' slots unrelated to the K buffers' (the
    attention never asserts they match) and AOTInductor compiled a step that read out of bounds
    once the cache grew past the example's slots."""
    batch, slots = batch_dim(), cache_slots_dim()
    return ({0: batch}, {0: batch}, {0: batch, 1: slots}, {0: batch}, tuple({0: batch, 2: slots} for _ in range(n_kv)))


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: Any) -> Any:
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export raises many types; the user needs the cause and a next step
        raise CaptureError(
            f"torch.export could not capture the {type(module).__name__} of {type(module.model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. tcompile captures "
            "transformers causal LMs that accept position_ids, a 4D attention mask and a DynamicCache"
        ) from exc
