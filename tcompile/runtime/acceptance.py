"""Acceptance rules of speculative decoding, per row, over a draft tree scored by the target.

- ``accept_greedy``: follow the child whose token is the target's argmax; the target's argmax
  after the last accepted node is the bonus token. Output identical to greedy decoding.
- ``accept_sample``: lossless rejection sampling. For a chain drawn from a drafter distribution
  q: accept x_i with probability min(1, p(x_i)/q(x_i)), else emit a draw from the residual
  norm(max(0, p - q)) and stop (Leviathan et al., ICML 2023; Chen et al., 2023). For a
  deterministic proposal (q = one-hot on each child, so a tree is allowed), draw x ~ p and follow
  the child whose token is x, else emit x and stop: the multi-round rule of SpecInfer (Miao et al.,
  ASPLOS 2024) with one-hot drafts, in closed form. Every emitted token is distributed as p.
- ``lantern``: LANTERN's relaxed acceptance (Jang et al., ICLR 2025) with token-embedding
  neighbourhoods: p̃(x) = p(x) + the largest prefix mass ≤ δ of x's nearest neighbours; accept with
  probability min(1, p̃(x)/q(x)). Lossy, with total variation ≤ δ per token; δ = 0 is exact.
"""
from __future__ import annotations

import torch

from tcompile.runtime.drafters import DraftTree


def children_of(tree: DraftTree) -> list[list[int]]:
    """Child node indices (1-based: node i of the tree is index i + 1; 0 is the root) per index."""
    kids: list[list[int]] = [[] for _ in range(tree.size + 1)]
    for i, p in enumerate(tree.parents):
        kids[p + 1].append(i + 1)
    return kids


def accept_greedy(tree: DraftTree, argmax: list[int]) -> tuple[list[int], int]:
    """``argmax`` [T]: the target's argmax at each node (0: root). → (accepted indices, 0 first;
    bonus token)."""
    kids = children_of(tree)
    path, node = [0], 0
    while True:
        want = argmax[node]
        nxt = next((c for c in kids[node] if tree.tokens[c - 1] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def relaxed_mass(p: torch.Tensor, token: int, neighbours: torch.Tensor, delta: float) -> float:
    """LANTERN's p̃(x): p(x) plus the largest prefix of p over x's neighbours (nearest first) whose
    total is ≤ delta."""
    mass = p[neighbours[token]].cumsum(0)
    ok = mass <= delta
    extra = float(mass[ok][-1]) if bool(ok.any()) else 0.0
    return float(p[token]) + extra


def accept_sample(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None,
                  neighbours: torch.Tensor | None = None, delta: float = 0.0) -> tuple[list[int], int]:
    """``probs`` [T, V]: the target's warped distribution at each node (0: root).
    ``neighbours`` [V, n] and ``delta``: LANTERN's relaxation (chains with q only)."""
    kids = children_of(tree)
    path, node = [0], 0
    q_all = tree.q
    if q_all is None and neighbours is not None and tree.parents == list(range(-1, tree.size - 1)) and tree.size:
        q_all = torch.nn.functional.one_hot(torch.tensor(tree.tokens), probs.shape[-1]).float()   # q = one-hot
    if q_all is not None:            # a chain drawn from q: Leviathan / Chen rejection sampling
        for i, token in enumerate(tree.tokens):
            p, q = probs[node], q_all[i].float()
            target = float(p[token]) if neighbours is None or delta <= 0 else relaxed_mass(p, token, neighbours, delta)
            u = float(torch.rand((), generator=generator))
            if u * float(q[token]) <= target:   # u ≤ p(x)/q(x), without dividing by q
                path.append(i + 1)
                node = i + 1
                continue
            residual = (p - q).clamp_min(0)
            total = float(residual.sum())
            dist = residual / total if total > 0 else p
            return path, int(torch.multinomial(dist, 1, generator=generator))
        return path, int(torch.multinomial(probs[node], 1, generator=generator))
    while True:                       # deterministic proposals: draw from p, follow a matching child
        x = int(torch.multinomial(probs[node], 1, generator=generator))
        nxt = next((c for c in kids[node] if tree.tokens[c - 1] == x), None)
        if nxt is None:
            return path, x
        path.append(nxt)
        node = nxt
