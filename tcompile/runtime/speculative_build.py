"""Build the speculative runtime from a captured LM and the ``speculative`` pass options."""
from __future__ import annotations

from typing import Any, Callable

import torch

from tcompile.errors import PassOptionError
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.runtime.drafters import Drafter, PromptLookup, TokenRecycling, budget_tree
from tcompile.runtime.lm_capture import LMSpec, inplace_cache_writes
from tcompile.runtime.speculative import SpeculativeRuntime
from tcompile.runtime.speculative_kv import expose_attention_rows


def make_drafter(options: SpeculativeOptions, spec: LMSpec, model: torch.nn.Module | None) -> Drafter:
    """The drafter ``options`` name, for the target LM described by ``spec``."""
    if options.drafter == "prompt_lookup":
        return PromptLookup(options.max_ngram, options.min_ngram, options.branches)
    if options.drafter == "token_recycling":
        return TokenRecycling(spec.vocab_size, options.top_k, budget_tree(options.tree_nodes, options.top_k, options.k))
    from tcompile.runtime.model_drafters import make_model_drafter
    return make_model_drafter(options, spec, model)


def embedding_neighbours(gm: torch.nn.Module, count: int) -> Callable[[], torch.Tensor]:
    """LANTERN's neighbourhoods for text: the ``count`` nearest tokens of each token by L2 distance
    between input embeddings (self excluded), computed once on first use, in chunks."""
    cache: dict[str, torch.Tensor] = {}

    def get() -> torch.Tensor:
        if "n" not in cache:
            weight = _input_embedding(gm)
            out = []
            for chunk in weight.split(2048):
                dist = torch.cdist(chunk, weight)
                out.append(dist.topk(count + 1, largest=False).indices[:, 1:])
            cache["n"] = torch.cat(out)
        return cache["n"]
    return get


def _input_embedding(gm: torch.nn.Module) -> torch.Tensor:
    for name, param in gm.named_parameters():
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
            return param.detach().float()
    raise PassOptionError("acceptance='lantern' needs the model's token embedding matrix to find neighbours; "
                          "none was found in the graph (use acceptance='sample')")


def build_speculative(spec: LMSpec, verify: torch.fx.GraphModule | None, options: SpeculativeOptions,
                      model: torch.nn.Module | None, **runtime_kwargs: Any) -> SpeculativeRuntime:
    """The ``SpeculativeRuntime`` around the functional ``verify`` graph (``capture_lm(...,
    verify=True)``'s, or an artifact's). The graph and options are kept on the runtime
    (``verify_graph``, ``speculative_options``) so it can be exported again, and so is the
    functional step the runtime calls (``verify_step_graph``: the verify graph plus the eviction
    policy's score outputs), which the ``aot`` and ``onnxruntime`` engines are built from."""
    if verify is None:
        raise PassOptionError("the speculative pass needs the verify graph: capture with capture_lm(model, "
                              "verify=True) (tcompile.optimize does this when the pipeline names speculative)")
    policy = runtime_kwargs.get("policy")
    step = verify
    if policy is not None and policy.options.decode == "evict" and policy.decode_scores:
        step = expose_attention_rows(verify, spec.kv_heads)   # H2O, TOVA rank by each token's attention
    drafter = make_drafter(options, spec, model)
    prefill, decode = runtime_kwargs.pop("prefill"), runtime_kwargs.pop("decode")
    runtime = SpeculativeRuntime(prefill, decode, spec, inplace_cache_writes(step), drafter, options.k,
                                 options.acceptance, options.delta, embedding_neighbours(verify, options.neighbours),
                                 **runtime_kwargs)
    runtime.verify_graph, runtime.verify_step_graph, runtime.speculative_options = verify, step, options
    return runtime
