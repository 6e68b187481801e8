"""Drafters for speculative decoding: the family base and the model-free drafters.

A drafter proposes, for each row, candidate continuations of the text so far as a tree whose
nodes come after their parents (a chain is the tree where node i's parent is node i - 1); the
verify step scores every node at once and the acceptance rule keeps the longest path the target
agrees with.

- ``PromptLookup``: n-gram match against the prompt and the generated text (Saxena,
  ``apoorvumang/prompt-lookup-decoding``; transformers' ``PromptLookupCandidateGenerator``).
- ``TokenRecycling``: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large
  Language Models with Token Recycling" (ACL 2025): an adjacency matrix [V, k] of the target's
  top-k successors seen after each token, read out as a static draft tree and updated from every
  verify step.

Model drafters (``draft_model``, ``layer_skip``) live in ``model_drafters.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class DraftTree:
    """Candidates after a root token: ``tokens`` [N], ``parents`` [N] (-1: the root, else the index
    of an earlier node), and optionally ``q`` [N, V], the drafter's distribution each node was
    drawn from (for lossless rejection sampling; None: a deterministic proposal)."""

    tokens: list[int]
    parents: list[int]
    q: torch.Tensor | None = None

    @staticmethod
    def chain(tokens: list[int], q: torch.Tensor | None = None) -> "DraftTree":
        return DraftTree(list(tokens), list(range(-1, len(tokens) - 1)), q)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def depth(self) -> list[int]:
        """Depth of each node (1 for children of the root)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out


class Drafter:
    """Family base: ``propose`` candidates per row; ``observe`` the verify step's outcome."""

    name = "drafter"
    tree = False        # whether proposals may branch (tree attention)
    top_candidates = 0  # the target's best tokens per scored position ``observe`` reads (0: none)

    sampling: tuple = (False, 1.0, None, None, None)   # (do_sample, temperature, top_k, top_p, generator)

    def configure(self, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None) -> None:
        """The target's sampling settings for this call (a model drafter warps its own
        distribution the same way, as speculative sampling requires)."""
        self.sampling = (do_sample, temperature, top_k, top_p, generator)

    def reset(self, prompts: list[torch.Tensor]) -> None:
        """Called after prefill with each row's real prompt tokens."""

    def propose(self, contexts: list[torch.Tensor], k: int) -> list[DraftTree]:
        """``contexts``: each row's tokens so far (prompt and generated, the root token last)."""
        raise NotImplementedError

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor, accepted: list[list[int]],
                nodes: torch.Tensor | None = None, top: torch.Tensor | None = None) -> None:
        """After verify: ``inputs`` [B, T] the scored tokens, ``logits`` [B, T, V], ``accepted``
        the node indices (0 = root) each row kept, ``nodes`` [B, T] bool: the real (not padding)
        positions of rows still generating, ``top`` [B, T, top_candidates]: the target's best
        tokens, best first, when the runtime already computed them (greedy decoding does, and
        takes its argmax from them), else None."""


class PromptLookup(Drafter):
    """The continuation of the latest earlier occurrence of the context's last n tokens, for n
    from ``max_ngram`` down to ``min_ngram``; the larger n wins. The latest occurrence is preferred
    to the first (the prompt-lookup reference takes the first): text that is being copied or that
    repeats the model's own output continues where it was matched last. With ``branches`` > 1 the
    continuations of that many distinct matches are merged into a tree (a trie of candidates)."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1) -> None:
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches

    def matches(self, context: torch.Tensor, k: int, limit: int) -> list[list[int]]:
        """Up to ``limit`` distinct continuations (≤ k tokens), longest n-gram first, latest first."""
        n_tok = int(context.numel())
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            windows = context[:-1].unfold(0, n, 1)                        # every n-gram but the suffix
            hits = (windows == context[-n:]).all(dim=1).nonzero().flatten().tolist()
            for hit in reversed(hits):
                cont = context[hit + n:hit + n + k].tolist()
                if cont and cont not in found:
                    found.append(cont)
                if len(found) >= limit:
                    return found
        return found

    def lookup(self, context: torch.Tensor, k: int) -> list[int]:
        found = self.matches(context, k, 1)
        return found[0] if found else []

    def propose(self, contexts: list[torch.Tensor], k: int) -> list[DraftTree]:
        if self.branches == 1:
            return [DraftTree.chain(self.lookup(c, k)) for c in contexts]
        return [trie(self.matches(c, k, self.branches)) for c in contexts]


def trie(chains: list[list[int]]) -> DraftTree:
    """Merge candidate chains into one tree (shared prefixes once), nodes in BFS order."""
    children: dict[tuple[int, int], int] = {}
    nodes: list[tuple[int, int, int]] = []          # (depth, parent, token) in insertion order
    for chain in chains:
        parent = -1
        for token in chain:
            key = (parent, token)
            if key not in children:
                children[key] = len(nodes)
                nodes.append((nodes[parent][0] + 1 if parent >= 0 else 1, parent, token))
            parent = children[key]
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i][0], i))
    new = {old: i for i, old in enumerate(order)}
    return DraftTree([nodes[i][2] for i in order], [new[nodes[i][1]] if nodes[i][1] >= 0 else -1 for i in order])


def assumed_chance(path: tuple[int, ...]) -> float:
    """The default rank profile: a rank-r successor is right with probability ∝ 0.6 / (r + 1)^1.5,
    a path's chance is the product."""
    out = 1.0
    for r in path:
        out *= 0.6 / (r + 1) ** 1.5
    return out


def budget_tree(nodes: int, top_k: int, depth: int,
                chance: Callable[[tuple[int, ...]], float] = assumed_chance) -> list[tuple[int, ...]]:
    """Token Recycling's static draft tree, sized for a budget: the ``nodes`` paths of ranks
    (c1, ..., cd), d ≤ depth, c < top_k, most likely to be accepted under a rank profile
    (``chance``: the assumed one, or measured shares as bench/token_recycling_profile.py fits).
    The paper's "2.2.2" template has 80 nodes over 6 levels, sized for a GPU; a CPU pays for every
    node it verifies. Grown from the roots by the best frontier path, so the set is a tree."""
    frontier, chosen = [(r,) for r in range(top_k)], []
    while frontier and len(chosen) < nodes:
        best = max(frontier, key=chance)
        frontier.remove(best)
        chosen.append(best)
        if len(best) < depth:
            frontier.extend(best + (r,) for r in range(top_k))
    return sorted(chosen, key=lambda p: (len(p), p))


class TokenRecycling(Drafter):
    """Adjacency matrix ``M`` [V, k_top] int32: row v holds the target's top-k next tokens seen
    most recently after v. A draft is the static tree ``paths`` read from M starting at the root
    token, less the subtrees under tokens whose row was never written; every verify step writes
    the top-k of each scored position into M (last write wins), and M persists across calls (the
    paper's hot start). 49,152 × 8 × 4 B = 1.5 MiB.

    The tree's nodes are ordered with the all-rank-0 chain first, then the rest breadth-first:
    the path accepted most often is then the first slots the verify step wrote, and the cache
    commit moves no entry for it."""

    name = "token_recycling"
    tree = True

    def __init__(self, vocab_size: int, top_k: int = 8, paths: list[tuple[int, ...]] | None = None) -> None:
        self.top_k = top_k
        paths = budget_tree(16, top_k, 6) if paths is None else paths
        self.paths = sorted(paths, key=lambda p: (any(p), len(p), p))      # the rank-0 chain first
        if any(r >= top_k for p in self.paths for r in p):
            raise ValueError(f"token_recycling: a tree path uses a rank ≥ top_k={top_k}")
        index = {p: i for i, p in enumerate(self.paths)}
        self.parents = [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]
        self.ranks = [p[-1] for p in self.paths]
        self.adjacency = torch.zeros(vocab_size, top_k, dtype=torch.int32)
        self.known = torch.zeros(vocab_size, dtype=torch.bool)

    @property
    def top_candidates(self) -> int:      # observe reads the target's top-k of every scored position
        return self.top_k

    @property
    def nbytes(self) -> int:
        return self.adjacency.numel() * self.adjacency.element_size()

    def reset(self, prompts: list[torch.Tensor]) -> None:
        pass   # M persists across requests (hot start)

    def propose(self, contexts: list[torch.Tensor], k: int) -> list[DraftTree]:
        out = []
        for context in contexts:
            # a node drafted from a token never seen has no successors in M (its row is zeros):
            # it and its subtree are dropped, so the verify step scores no token it cannot accept
            rows: dict[int, list[int] | None] = {}        # M's rows read this step (one read each)

            def successors(token: int) -> list[int] | None:
                if token not in rows:
                    rows[token] = self.adjacency[token].tolist() if bool(self.known[token]) else None
                return rows[token]

            root = int(context[-1])
            tokens: list[int] = []
            parents: list[int] = []
            placed: dict[int, int] = {}          # template node -> index in the draft
            for node, (parent, rank) in enumerate(zip(self.parents, self.ranks)):
                if len(self.paths[node]) > k or (parent >= 0 and parent not in placed):
                    continue
                row = successors(root if parent < 0 else tokens[placed[parent]])
                if row is None:
                    continue
                placed[node] = len(tokens)
                tokens.append(row[rank])
                parents.append(placed[parent] if parent >= 0 else -1)
            out.append(DraftTree(tokens, parents))
        return out

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor, accepted: list[list[int]],
                nodes: torch.Tensor | None = None, top: torch.Tensor | None = None) -> None:
        if top is None:
            top = logits.topk(self.top_k, dim=-1).indices
        flat_in, flat_top = inputs.reshape(-1), top[..., :self.top_k].reshape(-1, self.top_k).to(torch.int32)
        if nodes is not None and not bool(nodes.all()):     # padding positions write nothing
            keep = nodes.reshape(-1)
            flat_in, flat_top = flat_in[keep], flat_top[keep]
        self.adjacency[flat_in] = flat_top        # duplicates: one of the writes wins
        self.known[flat_in] = True
