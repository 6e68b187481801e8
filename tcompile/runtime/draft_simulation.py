"""Expected tokens per verify step of a drafter, without running the target model.

Why it is exact for greedy decoding: greedy verification keeps the longest draft path whose
tokens equal the target's own greedy continuation, plus one bonus token, so replaying a drafter
against the continuation the unoptimized model already generated gives the accepted length of
every step. The LM planner uses it to price speculative plans before it measures any
(Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", ICML 2023, §3:
the speed-up is the expected tokens per step over the relative cost of a step).

A drafter that learns from verify logits (Token Recycling) is fed the target's teacher-forced
logits of the accepted path only; the real loop also shows it the rejected nodes, so the
simulation slightly underestimates such a drafter.
"""
from __future__ import annotations

import torch

from tcompile.runtime.acceptance import accept_greedy
from tcompile.runtime.drafters import DraftTree, Drafter
from tcompile.runtime.speculative import trim


def simulate_acceptance(drafter: Drafter, prompt: torch.Tensor, generated: torch.Tensor, k: int,
                        logits: torch.Tensor | None = None) -> tuple[float, int]:
    """(tokens emitted per verify step, draft tokens per step) when ``drafter`` drafts ``k`` deep
    for the greedy generation ``generated`` [T] after ``prompt`` [N]. ``logits`` [T, V]: the
    target's logits predicting each generated token (``LMRuntime.teacher_force``), for drafters
    that observe them."""
    gen = generated.reshape(-1).tolist()
    total = len(gen)
    drafter.configure(False, 1.0, None, None, None)
    drafter.reset([prompt.reshape(-1)])
    emitted, steps, drafted = 1, 0, 0
    while emitted < total:
        room = total - emitted - 1
        context = torch.cat([prompt.reshape(-1), generated.reshape(-1)[:emitted]])
        tree = drafter.propose([context], min(k, room))[0] if room > 0 else DraftTree([], [])
        tree = trim(tree, room)
        depth = tree.depth()
        on_path: list[bool] = []
        for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
            want = emitted + depth[i] - 1
            on_path.append((parent < 0 or on_path[parent]) and want < total and token == gen[want])
        argmax = [gen[emitted]] + [gen[emitted + depth[i]] if on_path[i] and emitted + depth[i] < total else -1
                                   for i in range(tree.size)]
        path, _ = accept_greedy(tree, argmax)
        if logits is not None:
            rows = [r for r in range(emitted - 1, emitted - 1 + len(path)) if r + 1 < total]   # root, accepted
            inputs = torch.tensor([gen[r] for r in rows])[None]
            drafter.observe(inputs, logits[[r + 1 for r in rows]][None], [path])
        drafted += tree.size
        emitted += len(path)           # the accepted drafts and the bonus token
        steps += 1
    if steps == 0:
        return 1.0, 0
    return (total - 1) / steps, round(drafted / steps)
