"""Sparse attention for long prefill: the ``sparse_attention`` pass (MInference 1.0).

Prefill of an N-token prompt costs O(N²) in attention, yet each head's attention concentrates in
a pattern that can be estimated from the prompt itself (Jiang et al., "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024). The
pass replaces every ``scaled_dot_product_attention`` of a causal LM's *prefill* graph by the custom
op ``tcompile::sparse_prefill_attention``, which at run time, per row and head, estimates the
pattern from q/k (``vertical_slash``, ``block_topk``; ``a_shape`` is static) and computes only
the pairs it keeps: the Triton ops of ``tcompile.kernels`` on CUDA, a gathered PyTorch path on CPU
(``sparse_ops``). Decode steps stay dense (one query per row; MInference's q_len = 1 rule).

* Left padding: each row is processed without its padding (found from the last row of the
  additive mask, which tcompile's prefill builds as causal AND key-not-padding), so padding keys
  are never attended and a padded row gets exactly the unpadded row's result; padding queries
  output zeros. A mask whose last row is not left padding falls back to dense SDPA; otherwise the
  mask is taken to be causal (the contract of ``capture_lm``'s prefill).
* ``density`` is a work budget (share of the causal pairs computed, see ``sparse_ops``).
  ``tiles=true`` (the default) lets every causal key of a diagonal's computed key range through,
  as MInference's kernel does; ``tiles=false`` keeps the exact vertical-slash lines (same work,
  less attention mass). The ranges are the kernel's greedy tile cover on CUDA and the block-wide
  ranges around each kept diagonal on CPU (``sparse_ops.slash_visits``); both contain every kept line.
* Prompts (rows) shorter than ``min_tokens`` (default four blocks, so also any sequence shorter
  than one block) use dense SDPA: there sparse attention saves nothing.
* ``pattern=auto`` uses a per-layer, per-head table of patterns in the ``table`` option, chosen
  by :func:`calibrate` on a calibration prompt (the cheapest pattern whose recall of the dense
  attention mass is ≥ ``recall``; dense when none is), so the pipeline text replays it.

The op is opaque to tracing (a ``torch.library`` custom op with a fake kernel), so the rewritten
prefill still exports with ``torch.export``; ONNX has no translation for it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from tcompile import _compat
from tcompile.analysis.graph_utils import SDPA_OPS
from tcompile.cost.flops import SOFTMAX_FLOPS_PER_ELEM, NodeCost
from tcompile.cost.probe import Probe, TensorSpec
from tcompile.errors import PassOptionError
from tcompile.pass_manager import PassContext, PassSkipped
from tcompile.passes import sparse_ops
from tcompile.registry import register_pass

log = logging.getLogger(__name__)

PATTERNS = ("vertical_slash", "a_shape", "block_topk", "auto")
AUTO_ORDER = ("a", "b", "v")   # cheapest first: static blocks, pooled estimate, last_q estimate + gathered lines


@dataclass(frozen=True)
class SparseAttentionOptions:
    """Pattern and budget of sparse prefill attention (token counts are per sequence)."""

    pattern: str = "vertical_slash"   # vertical_slash | a_shape | block_topk | auto (per-head table)
    density: float = 0.3              # share of the causal query/key pairs kept, in (0, 1]
    block: int = 64                   # query/key block size (a power of two >= 16: the kernels' tiles)
    sinks: int = 64                   # first tokens always attended (vertical columns / sink blocks)
    window: int = 64                  # nearest tokens always attended, self included (diagonals / local blocks)
    last_q: int = 64                  # queries whose attention estimates vertical_slash (MInference's 64;
                                      # SmolLM2 at 4k: +8.0% perplexity, last_q=256: +4.8% but the estimate
                                      # then costs about as much as 10% of the attention at 8k)
    recall: float = 0.95              # auto: least share of dense attention mass a pattern must keep
    min_tokens: int | None = None     # shorter rows run dense; None: 4 blocks
    tiles: bool = True                # vertical_slash: attend every causal key of the diagonals' key ranges
                                      # (MInference's kernel; same work, more recall), not only the lines
    table: str = ""                   # auto: per layer one code per query head, layers joined by '/'
                                      # (a=a_shape, b=block_topk, v=vertical_slash, d=dense); see calibrate()

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise PassOptionError(f"sparse_attention: pattern={self.pattern!r} is unknown; choose one of {PATTERNS}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise PassOptionError(f"sparse_attention: density={self.density!r} must lie in (0, 1] (the share of "
                                  "causal attention pairs kept; 1 = dense)")
        if not isinstance(self.block, int) or self.block < 16 or self.block & (self.block - 1):
            raise PassOptionError(f"sparse_attention: block={self.block!r} must be a power of two >= 16 "
                                  "(the sparse kernels work in block x block tiles)")
        for name in ("sinks", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise PassOptionError(f"sparse_attention: {name}={getattr(self, name)!r} must be a non-negative "
                                      "number of tokens")
        if not isinstance(self.last_q, int) or self.last_q < 1:
            raise PassOptionError(f"sparse_attention: last_q={self.last_q!r} must be a positive number of queries "
                                  "(MInference estimates vertical_slash from the last 64)")
        if isinstance(self.recall, bool) or not isinstance(self.recall, (int, float)) or not 0 < self.recall <= 1:
            raise PassOptionError(f"sparse_attention: recall={self.recall!r} must lie in (0, 1]")
        if self.min_tokens is not None and (not isinstance(self.min_tokens, int) or self.min_tokens < self.block):
            raise PassOptionError(f"sparse_attention: min_tokens={self.min_tokens!r} would make sequences shorter than "
                                  f"one block ({self.block} tokens) sparse, where no block pattern exists; use "
                                  f"min_tokens>={self.block} (shorter prompts then run dense) or a smaller block")
        if not isinstance(self.tiles, bool):
            raise PassOptionError(f"sparse_attention: tiles={self.tiles!r} must be true or false")
        if not isinstance(self.table, str) or set(self.table) - set(sparse_ops.CODES) - {"/"}:
            raise PassOptionError(f"sparse_attention: table={self.table!r} must hold pattern codes "
                                  f"{sorted(sparse_ops.CODES)} per head, layers separated by '/'")
        if self.table and self.pattern != "auto":
            raise PassOptionError("sparse_attention: table is the per-head choice of pattern=auto; drop it or set "
                                  "pattern=auto")

    @property
    def min_len(self) -> int:
        return 4 * self.block if self.min_tokens is None else self.min_tokens

    def layer_codes(self) -> list[str]:
        return self.table.split("/") if self.table else []


@torch.library.custom_op("tcompile::sparse_prefill_attention", mutates_args=())
def sparse_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             codes: str, density: float, block: int, sinks: int, window: int, last_q: int,
                             min_tokens: int, scale: float, tiles: bool = False) -> torch.Tensor:
    """Causal prefill attention, sparse per ``codes`` (one code, or one per query head).

    q [B, Hq, N, d]; k, v [B, Hkv, N, d] (Hq a multiple of Hkv); ``mask`` the prefill's
    additive (or boolean) [B|1, 1, N, N] mask, causal AND key-not-padding with left padding, or
    None (no padding); ``scale`` <= 0 means 1/sqrt(d). Returns [B, Hq, N, d].
    """
    bsz, h, n, d = q.shape
    scale = sparse_ops.head_scale(d, scale)
    if mask is None:
        real = torch.full((bsz,), n, dtype=torch.long, device=q.device)
    else:
        last = mask[:, 0, -1, :].expand(bsz, n)
        valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
        real = valid.sum(1)
        left_padded = bool((valid == (torch.arange(n, device=q.device) >= n - real[:, None])).all())
        if not left_padded:
            log.warning("sparse_prefill_attention: the mask is not causal + left padding; running dense SDPA")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != h)
    lengths = real.tolist()
    if bsz == 1 and lengths[0] == n and n >= max(min_tokens, 1) and set(codes) != {"d"}:   # no padding: no copies
        return sparse_ops.attend(q[0], k[0], v[0], codes, density, block, sinks, window, last_q, scale,
                                 use_kernels=q.is_cuda, tiles=tiles)[None].contiguous()
    out = torch.zeros_like(q)
    for b, length in enumerate(lengths):
        qs, ks, vs = q[b, :, n - length:], k[b, :, n - length:], v[b, :, n - length:]
        if length == 0:
            continue
        if length < max(min_tokens, 1) or set(codes) == {"d"}:
            res = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scale,
                                                 enable_gqa=ks.shape[0] != h)[0]
        else:
            res = sparse_ops.attend(qs, ks, vs, codes, density, block, sinks, window, last_q, scale,
                                    use_kernels=q.is_cuda, tiles=tiles)
        out[b, :, n - length:] = res
    return out


@sparse_prefill_attention.register_fake
def _(q, k, v, mask, codes, density, block, sinks, window, last_q, min_tokens, scale, tiles=False):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


#: Eager aten ops the CPU path dispatches per call, per pattern code: ``base + slope * density * n``
#: (top-level ops counted with torch.profiler, torch 2.13, 9 query heads, n = 512..4,096): the
#: estimate and the gathered blocks are many small ops, which the per-op overhead prices.
CPU_OPS: dict[str, tuple[float, float]] = {"v": (480.0, 0.42), "b": (90.0, 0.36), "a": (121.0, 0.38), "d": (1.0, 0.0)}
KERNEL_OPS = 40.0   # with the Triton kernels: the estimate's ops and one launch per code


def sparse_work(codes: str, density: float, block: int, heads: int, n: int, d: int, on_cpu: bool,
                last_q: int = 64, min_tokens: int = 0) -> tuple[float, float]:
    """(FLOPs, dispatched ops) of one call on an unpadded ``n``-token row: the dense causal
    attention FLOPs times ``density`` (rows shorter than ``min_tokens`` run dense), plus
    vertical_slash's estimate (the last ``last_q`` queries against every key)."""
    pairs = n * (n + 1) / 2
    dense = n < max(min_tokens, 1) or set(codes) == {"d"}
    share = 1.0 if dense else float(density)
    flops = heads * pairs * share * (4.0 * d + SOFTMAX_FLOPS_PER_ELEM)
    if "v" in codes and not dense:
        flops += heads * min(last_q, n) * n * (2.0 * d + SOFTMAX_FLOPS_PER_ELEM)
    if dense:
        return flops, 1.0
    if not on_cpu:
        return flops, KERNEL_OPS
    return flops, sum(base + slope * share * n for base, slope in (CPU_OPS[c] for c in set(codes)))


def _op_cost(node: torch.fx.Node, size: Callable[[object], int]) -> NodeCost:
    """Cost-model rule for the op (:func:`sparse_work` per batch row, plus the q/k/v/output
    traffic); kind ``sparse_attention``, priced at the profile's measured sparse rate, or
    ``attention`` when the rows run dense. It carries a probe (the op on random q/k/v of the
    node's shapes, no padding): on a profile measured on this host the op is timed instead, as
    its tile loop's time follows where the estimated pattern falls, not its FLOPs."""
    q, k = (a.meta["val"] for a in node.args[:2])
    codes, density, block, sinks, window, last_q, min_tokens, scale = node.args[4:12]
    tiles = node.args[12] if len(node.args) > 12 else node.kwargs.get("tiles", False)
    bsz, heads, n, d = (size(x) for x in q.shape)
    kv_shape = (bsz, size(k.shape[1]), n, d)
    flops, ops = sparse_work(codes, density, block, heads, n, d, q.device.type == "cpu", last_q, min_tokens)
    nbytes = (2 * bsz * heads + 2 * bsz * kv_shape[1]) * n * d * q.element_size()
    probe = Probe(torch.ops.tcompile.sparse_prefill_attention.default,
                  (TensorSpec((bsz, heads, n, d), q.dtype), TensorSpec(kv_shape, q.dtype), TensorSpec(kv_shape, q.dtype),
                   None, codes, density, block, sinks, window, last_q, min_tokens, scale, tiles))
    return NodeCost(bsz * flops, float(nbytes), "attention" if ops == 1.0 else "sparse_attention", bsz * ops,
                    probe)


sparse_prefill_attention._opoverload.__tcompile_cost__ = _op_cost


def _sdpa_sites(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS]


def _arg(node: torch.fx.Node, index: int, name: str, default: object) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _heads(node: torch.fx.Node) -> int | None:
    val = getattr(node.args[0], "meta", {}).get("val")
    return int(val.shape[1]) if val is not None else None


@register_pass("sparse_attention", options=SparseAttentionOptions, family="sparse_attention")
def sparse_attention(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """MInference sparse prefill attention: per-head patterns estimated online from the prompt."""
    stage = ctx.program.info.get("lm_stage")
    if stage is None:
        raise PassSkipped("sparse_attention makes the prefill of causal LMs sparse; this graph is not a causal-LM "
                          "prefill step (optimize a causal LM, e.g. LlamaForCausalLM, to use it)")
    if stage != "prefill":
        raise PassSkipped(f"sparse_attention acts on the prefill step only; the {stage} step has one query per row, "
                          "whose attention over the cache is already linear in its length (MInference keeps it dense)")
    o: SparseAttentionOptions = ctx.options
    sites = _sdpa_sites(gm)
    if not sites:
        raise PassSkipped("the prefill graph has no scaled_dot_product_attention node to make sparse")
    codes = o.layer_codes() if o.pattern == "auto" else [sparse_ops.CODE_OF[o.pattern]] * len(sites)
    if o.pattern == "auto" and not codes:
        raise PassOptionError("sparse_attention: pattern=auto needs its per-head table; run "
                              "tcompile.passes.sparse_attention.calibrate(program, calibration_ids) and use the "
                              "options it returns")
    if len(codes) != len(sites):
        raise PassOptionError(f"sparse_attention: table has {len(codes)} layers but the prefill graph has "
                              f"{len(sites)} attention sites; calibrate on this model")
    rewritten = 0
    for node, layer_codes in zip(sites, codes):
        heads = _heads(node)
        if len(layer_codes) != 1 and heads is not None and len(layer_codes) != heads:
            raise PassOptionError(f"sparse_attention: table layer {layer_codes!r} has {len(layer_codes)} codes "
                                  f"but {node.name} has {heads} query heads")
        mask = _arg(node, 3, "attn_mask", None)
        if (mask is None and not _arg(node, 5, "is_causal", False)) or _arg(node, 4, "dropout_p", 0.0):
            continue   # not causal self-attention (or training dropout): leave it dense
        scale = _arg(node, 6, "scale", None)
        args = (*node.args[:3], mask, layer_codes, float(o.density), o.block, o.sinks, o.window, o.last_q,
                o.min_len, -1.0 if scale is None else float(scale), o.tiles)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.tcompile.sparse_prefill_attention.default, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    ctx.stats.update(sites=rewritten, pattern=o.pattern, density=o.density, block=o.block, min_tokens=o.min_len)
    if o.pattern == "auto":
        ctx.stats["heads"] = {sparse_ops.CODES[c]: o.table.count(c) for c in sorted(set(o.table) - {"/"})}
    if not rewritten:
        raise PassSkipped("no causal self-attention site in the prefill graph (every SDPA is non-causal or uses "
                          "dropout)")
    return PassResult(gm, True)


# ----------------------------------------------------------------------------- auto: calibration
def _probe(q: torch.Tensor, k: torch.Tensor, density: float, block: int, sinks: int, window: int, last_q: int,
           scale: float | None, tiles: bool = False) -> torch.Tensor:
    """Recall [len(AUTO_ORDER), Hq] of each candidate pattern on the first (unpadded) row, over the
    last half of the queries (where the patterns are sparse; early rows are dense under all)."""
    q0, k0 = q[0].float(), k[0].float()
    h, n, d = q0.shape
    scale = sparse_ops.head_scale(d, scale)
    kv_of = torch.arange(h, device=q.device) // (h // k0.shape[0])
    rows = slice(n // 2, n)
    j = torch.arange(n, device=q.device)
    logits = (q0[:, rows] @ k0.index_select(0, kv_of).transpose(1, 2)) * scale
    probs = logits.masked_fill(j[None, :] > j[rows][:, None], float("-inf")).softmax(-1)
    out = []
    for code in AUTO_ORDER:
        indices = sparse_ops.estimate(code, q0, k0, kv_of, density, block, sinks, window, last_q, scale)
        kind = ("vertical_slash_tiles" if tiles else "vertical_slash") if code == "v" else "blocks"
        out.append(sparse_ops.recall(probs, sparse_ops.pattern_mask(kind, indices, n, block, rows)))
    return torch.stack(out)


def pattern_recalls(program: object, input_ids: torch.Tensor, options: SparseAttentionOptions | None = None
                    ) -> torch.Tensor:
    """Recall [layers, len(AUTO_ORDER), Hq] of each candidate pattern (AUTO_ORDER: a_shape,
    block_topk, vertical_slash) on one calibration prompt, run through the dense prefill graph of
    ``program`` (an ``LMProgram`` or its prefill ``Program``)."""
    o = options or SparseAttentionOptions()
    prefill = getattr(program, "prefill", program)
    ids = input_ids.reshape(1, -1)
    if ids.shape[1] < 4 * o.block:
        raise ValueError(f"sparse_attention calibration: the prompt has {ids.shape[1]} tokens, fewer than four "
                         f"blocks of {o.block}; per-head patterns are estimated on long prompts: give one of the "
                         "prompt lengths the model will serve (thousands of tokens)")
    gm = _compat.clone_graph_module(prefill.gm)
    probes = []
    for node in _sdpa_sites(gm):
        with gm.graph.inserting_after(node):
            probes.append(gm.graph.call_function(_probe, (node.args[0], node.args[1], float(o.density), o.block,
                                                          o.sinks, o.window, o.last_q, _arg(node, 6, "scale", None),
                                                          o.tiles)))
    _compat.append_graph_outputs(gm, probes)
    gm.recompile()
    with torch.no_grad():
        outs = gm(ids, torch.ones_like(ids))
    return torch.stack(list(outs[-len(probes):]))


def calibrate(program: object, input_ids: torch.Tensor, options: SparseAttentionOptions | None = None
              ) -> SparseAttentionOptions:
    """``pattern=auto`` options whose table gives each layer's heads the cheapest pattern (a_shape <
    block_topk < vertical_slash: estimation work and kernel regularity at equal density) whose
    recall of dense attention mass on ``input_ids`` (one long, representative prompt) reaches
    ``options.recall``; dense ('d') where none does. MInference's offline per-head search, with
    its v1 criterion (attention mass kept) and the density as the budget."""
    o = options or SparseAttentionOptions()
    recalls = pattern_recalls(program, input_ids, o)
    layers = []
    for per_layer in recalls:
        ok = per_layer >= o.recall                                    # [candidates, H]
        layers.append("".join(next((AUTO_ORDER[c] for c in range(len(AUTO_ORDER)) if ok[c, h]), "d")
                              for h in range(per_layer.shape[1])))
    return dataclasses.replace(o, pattern="auto", table="/".join(layers))
