"""Model drafters: a smaller LM (``draft_model``) or the target with layers skipped (``layer_skip``).

``ModelDrafter`` runs a causal LM captured with its verify step on its own cache: each call first
feeds the tokens the target emitted since the last call (the accepted ones are already there),
then drafts up to k tokens one at a time. BiLD's fallback policy (Kim et al., "Speculative
Decoding with Big Little Decoder", NeurIPS 2023) stops drafting once the draft's top-1
probability falls below ``fallback``; its rollback is the verify step's: the draft's entries past
the accepted prefix are marked invalid (bookkeeping, as in the target's cache). When sampling,
each drafted token is drawn from the draft's warped distribution q, returned for the lossless
rejection rule.

``layer_skip`` is self-speculation (Zhang et al., "Draft & Verify", ACL 2024; Xia et al.,
"SWIFT", ICLR 2025): the same model with some decoder layers left out drafts. The skipped set is
chosen on calibration text by teacher forcing: the fraction of positions where the skipped
model's argmax equals the full model's (SWIFT's matchness) gives an expected accepted length
(1 - a^(k+1)) / (1 - a), divided by the cost of a step, k·(kept / L) + 1 full-model verifies.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from tcompile.errors import PassOptionError
from tcompile.runtime.drafters import Drafter, DraftTree
from tcompile.runtime.generate import LMRuntime
from tcompile.runtime.lm_capture import LMProgram, LMSpec, capture_lm, inplace_cache_writes
from tcompile.runtime.sampling import warp_logits
from tcompile.runtime.speculative import commit, pack, verify_into

log = logging.getLogger(__name__)


class ModelDrafter(Drafter):
    """A chain drafter driven by a captured LM (prefill + verify graphs) with its own cache."""

    name = "draft_model"

    def __init__(self, program: LMProgram, fallback: float = 0.0) -> None:
        if program.verify is None:
            raise PassOptionError("the draft model must be captured with capture_lm(draft, verify=True)")
        self.spec, self.fallback = program.spec, fallback
        self.runtime = LMRuntime(program.prefill.gm, None, program.spec)
        self.verify_fn = inplace_cache_writes(program.verify.gm)
        self.cache: Any = None
        self.fed: list[int] = []
        self.context_len: list[int] = []

    def reset(self, prompts: list[torch.Tensor]) -> None:
        width = max(int(p.numel()) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - p.numel():], mask[row, width - p.numel():] = p, 1
        _, self.cache = self.runtime._prefill(ids, mask, None)
        self.fed = [int(p.numel()) for p in prompts]

    def _feed(self, chains: list[list[int]]) -> torch.Tensor:
        """Append each row's chain (possibly empty: nothing kept) to the cache; logits [B, T, V]."""
        trees = [DraftTree.chain(c[1:]) for c in chains]
        roots = torch.tensor([c[0] if c else 0 for c in chains])
        ids, depth, anc = pack(trees, roots)
        logits, slots, _ = verify_into(self.verify_fn, self.spec, self.cache, ids, depth, anc)
        commit(self.cache, slots, [list(range(len(c))) for c in chains])
        for row, c in enumerate(chains):
            self.fed[row] += len(c)
        return logits

    def propose(self, contexts: list[torch.Tensor], k: int) -> list[DraftTree]:
        do_sample, temperature, top_k, top_p, generator = self.sampling
        batch = len(contexts)
        pending = [c[self.fed[row]:].tolist() for row, c in enumerate(contexts)]
        logits = self._feed(pending)
        last = torch.stack([logits[row, len(p) - 1] for row, p in enumerate(pending)])
        self.context_len = [int(c.numel()) for c in contexts]
        drafted: list[list[int]] = [[] for _ in range(batch)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        active = [True] * batch
        for step in range(k):
            warped = warp_logits(last, temperature, top_k, top_p) if do_sample else last.float()
            probs = warped.softmax(dim=-1)
            if do_sample:
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                tokens = last.argmax(dim=-1)
            confident = (probs.amax(dim=-1) >= self.fallback).tolist()
            for row in range(batch):
                active[row] = active[row] and confident[row]
                if active[row]:
                    drafted[row].append(int(tokens[row]))
                    qs[row].append(probs[row])
            if step == k - 1 or not any(active):
                break
            last = self._feed([[int(tokens[row])] if active[row] else [] for row in range(batch)])[:, 0]
        return [DraftTree.chain(d, torch.stack(q) if do_sample and q else None) for d, q in zip(drafted, qs)]

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor, accepted: list[list[int]],
                nodes: torch.Tensor | None = None, top: torch.Tensor | None = None) -> None:
        """Roll the draft's cache back to the accepted prefix (entries past it become invalid)."""
        keep = torch.tensor([n + max(len(p) - 1, 0) for n, p in zip(self.context_len, accepted)])
        cache = self.cache
        drop = cache.valid & (cache.pos[:, 0, 0, :] >= keep[:, None])
        cache.valid &= ~drop
        cache.pos.masked_fill_(drop[:, None, None, :], -1)
        self.fed = [min(f, int(n)) for f, n in zip(self.fed, keep)]
        cache.seen = torch.tensor(self.fed)


def _layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the decoder layers' ModuleList, and its attribute name."""
    for owner in (getattr(model, "model", None), getattr(model, "transformer", None)):
        for attr in ("layers", "h"):
            if owner is not None and isinstance(getattr(owner, attr, None), torch.nn.ModuleList):
                return owner, attr
    raise PassOptionError(f"layer_skip cannot find the decoder layers of {type(model).__name__} (looked for "
                          "model.layers and transformer.h); use drafter=prompt_lookup or token_recycling")


def _renumbered(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    """A shallow copy of ``layer`` whose modules that carry a ``layer_idx`` (the cache layer they
    read and write) get ``index``; parameters stay shared."""
    out = copy.copy(layer)
    out._modules = {name: (_renumbered(child, index) if any(hasattr(m, "layer_idx") for m in child.modules())
                           else child) for name, child in layer._modules.items()}
    if hasattr(out, "layer_idx"):
        out.layer_idx = index
    return out


def skip_layers(model: torch.nn.Module, skip: tuple[int, ...]) -> torch.nn.Module:
    """A shallow copy of ``model`` without the layers ``skip`` (parameters shared, the user's model
    untouched); the kept layers are renumbered, so the copy has its own smaller cache."""
    owner, attr = _layers(model)
    layers = getattr(owner, attr)
    if not skip:
        raise PassOptionError("layer_skip: skip=() skips nothing; name at least one layer")
    bad = [i for i in skip if not 0 <= i < len(layers)]
    if bad:
        raise PassOptionError(f"layer_skip: skip={tuple(skip)} names layers {bad} outside 0..{len(layers) - 1}")
    kept = [i for i in range(len(layers)) if i not in set(skip)]
    if not kept:
        raise PassOptionError("layer_skip: skip names every layer; keep at least one")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    inner = copy.copy(owner)
    inner._modules = dict(owner._modules)
    inner._modules[attr] = torch.nn.ModuleList([_renumbered(layers[i], new) for new, i in enumerate(kept)])
    inner.config = config
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone._modules["model" if owner is getattr(model, "model", None) else "transformer"] = inner
    clone.config = config
    return clone


def choose_skip(model: torch.nn.Module, calibration: torch.Tensor, k: int, ratio: float) -> tuple[int, ...]:
    """The candidate skip set with the best expected accepted length per cost on ``calibration``
    [1, N] (teacher forced). Candidates skip every other layer, or one contiguous block, from the
    middle outwards, never the first or last layer (SWIFT), up to ``ratio`` of the layers."""
    n = len(getattr(*_layers(model)))
    most = max(1, int(ratio * n))
    inner = list(range(1, n - 1)) if n > 3 else list(range(1, n))   # tiny models: only the first is kept
    if not inner:
        raise PassOptionError(f"layer_skip needs a model with at least 2 layers; this one has {n}")
    candidates: list[tuple[int, ...]] = []
    for count in sorted({max(1, most // 4), max(1, most // 2), max(1, (3 * most) // 4), most}):
        odd = [i for i in inner if i % 2 == 1]
        candidates.append(tuple(sorted(odd or inner, key=lambda i: abs(i - n / 2))[:count]))
        start = min(max(1, (n - count) // 2), inner[-1])
        candidates.append(tuple(range(start, min(inner[-1] + 1, start + count))))
    with torch.no_grad():
        full = model(calibration).logits.argmax(-1)
        best, best_score = candidates[0], -1.0
        for skip in dict.fromkeys(c for c in candidates if c):
            match = float((skip_layers(model, skip)(calibration).logits.argmax(-1) == full).float().mean())
            alpha = min(match, 0.999)
            length = (1 - alpha ** (k + 1)) / (1 - alpha)
            score = length / (k * (n - len(skip)) / n + 1)
            log.info("layer_skip candidate %s: matchness %.3f, score %.3f", skip, match, score)
            if score > best_score:
                best, best_score = skip, score
    return tuple(sorted(best))


def make_model_drafter(options: Any, spec: LMSpec, model: torch.nn.Module | None,
                       calibration: torch.Tensor | None = None) -> Drafter:
    """The ``draft_model`` or ``layer_skip`` drafter of ``options`` for the target LM (``spec``)."""
    if options.drafter == "draft_model":
        draft = options.draft
        if isinstance(draft, torch.nn.Module):
            draft = capture_lm(draft, type(draft).__name__ + ".draft", verify=True)
        if not isinstance(draft, LMProgram):
            raise PassOptionError(f"draft={type(draft).__name__} is not a causal LM; pass a transformers causal LM "
                                  "(or an LMProgram from capture_lm(model, verify=True))")
        if draft.spec.vocab_size != spec.vocab_size:
            raise PassOptionError(
                f"the draft model has a vocabulary of {draft.spec.vocab_size} tokens, the target "
                f"{spec.vocab_size}: speculative decoding needs a draft with the target's tokenizer "
                "(a smaller model of the same family), or a model-free drafter (prompt_lookup, token_recycling)")
        return ModelDrafter(draft, options.fallback)
    if model is None:
        raise PassOptionError("drafter='layer_skip' needs the target model (tcompile.optimize passes it; with "
                              "runtime_for pass model=...)")
    skip = options.skip
    if skip is None:
        if calibration is None:
            calibration = torch.randint(0, spec.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        skip = choose_skip(model, calibration.reshape(1, -1), options.k, options.skip_ratio)
    drafter = ModelDrafter(capture_lm(skip_layers(model, tuple(skip)), "layer_skip", verify=True), options.fallback)
    drafter.name = "layer_skip"
    drafter.skip = tuple(skip)   # type: ignore[attr-defined]
    return drafter
