"""float64 reference implementations, written as plain loops, of the token-reduction algorithms.

They follow the papers' steps one example at a time so the vectorised, exportable versions in
``tcompile.passes`` can be checked against something that is obviously right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sources(pads, ranked, r):
    """Pads go first (any r of them: they carry nothing), then the ranked real candidates."""
    return (pads + [i for i in ranked if i not in pads])[:r]


def _merge(x, sizes, protect, arrangement, src, dest_of):
    """Size-weighted merge: each source joins its destination's group; kept tokens in arrangement order."""
    body, s = x[protect:], sizes[protect:]
    kept = [i for i in arrangement if i not in src]
    groups = {j: [j] for j in kept}
    for i in src:
        if s[i] > 0:
            groups[dest_of[i]].append(i)
    out_x, out_s = [x[p] for p in range(protect)], [sizes[p] for p in range(protect)]
    for j in kept:
        tot = sum(s[m] for m in groups[j])
        out_x.append(sum(s[m] * body[m] for m in groups[j]) / tot if tot > 0 else body[j])
        out_s.append(tot)
    return torch.stack(out_x), torch.stack(out_s)


def ref_tome(x, k, sizes, r, protect):
    """ToMe bipartite soft matching for one example: x [N, C], k [H, N, d], sizes [N].

    Pads (size 0) are merged first, from either side; real tokens only merge into real ones."""
    metric = k.mean(0)[protect:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    s = sizes[protect:]
    n = len(s)
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))
    real_b = [j for j in b_ids if s[j] > 0]
    best = {i: max(real_b, key=lambda j: float(metric[i] @ metric[j])) for i in a_ids if s[i] > 0}
    ranked = sorted(best, key=lambda i: -float(metric[i] @ metric[best[i]]))
    src = _sources([i for i in range(n) if s[i] <= 0], ranked, r)
    return _merge(x, sizes, protect, a_ids + b_ids, src, best)   # ToMe's order: [unmerged A, B]


def ref_pitome(x, k, sizes, r, protect, margin):
    """PiToMe for one example; energy over real tokens only, pads merged first."""
    metric = k.mean(0)[protect:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    s = sizes[protect:]
    t = len(s)
    real = [j for j in range(t) if s[j] > 0]
    sim = metric @ metric.T
    energy = {i: float(F.elu(sim[i, real] - margin).mean()) for i in real}
    order = sorted(real, key=lambda i: -energy[i]) + [i for i in range(t) if s[i] <= 0]
    a, b, keep = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
    real_b = [j for j in b if s[j] > 0]
    best = {i: max(real_b, key=lambda j: float(sim[i, j])) for i in a if s[i] > 0}
    src = _sources([i for i in range(t) if s[i] <= 0], [i for i in a if s[i] > 0], r)
    return _merge(x, sizes, protect, a + keep + b, src, best)


def ref_evit(x, q, k, sizes, keep, protect, fuse, scale=None):
    """EViT for one example: CLS attention averaged over heads; kept in original order."""
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    probs = torch.softmax((q[:, 0:1] @ k.transpose(-1, -2))[:, 0] * scale, dim=-1)   # [H, N]
    score = probs.mean(0)[protect:]
    ranked = sorted(range(len(score)), key=lambda i: -float(score[i]))
    kept = sorted(ranked[:keep])
    body = x[protect:]
    out = [x[p] for p in range(protect)] + [body[i] for i in kept]
    out_s = [sizes[p] for p in range(protect)] + [sizes[protect + i] for i in kept]
    if fuse:
        pruned = [i for i in range(len(body)) if i not in kept]
        out.append(sum(score[i] * body[i] for i in pruned))
        out_s.append(sum(sizes[protect + i] for i in pruned))
    return torch.stack(out), torch.stack(out_s)
