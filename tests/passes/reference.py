"""float64 reference implementations, written as plain loops, of the token-reduction algorithms.

They follow the papers' steps one example at a time so the vectorised, exportable versions in
``tcompile.passes`` can be checked against something that is obviously right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ref_tome(x, k, sizes, r, protect):
    """ToMe bipartite soft matching for one example: x [N, C], k [H, N, d], sizes [N]."""
    metric = k.mean(0)[protect:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    body, s = x[protect:], sizes[protect:]
    a_ids, b_ids = list(range(0, len(body), 2)), list(range(1, len(body), 2))
    best = []
    for i in a_ids:
        sims = [float(metric[i] @ metric[j]) + (1e4 if s[i] <= 0 else 0.0) for j in b_ids]
        j = max(range(len(sims)), key=lambda t: sims[t])
        best.append((sims[j], i, b_ids[j]))
    order = sorted(range(len(best)), key=lambda t: -best[t][0])
    src = {best[t][1]: best[t][2] for t in order[:r]}
    groups = {j: [j] for j in b_ids}
    for i, j in src.items():
        groups[j].append(i)
    unm = sorted(best[t][1] for t in order[r:])   # ToMe re-sorts the unmerged A tokens
    out_x, out_s = [x[p] for p in range(protect)], [sizes[p] for p in range(protect)]
    for i in unm:
        out_x.append(body[i]), out_s.append(s[i])
    for j in b_ids:
        tot = sum(s[m] for m in groups[j])
        out_x.append(sum(s[m] * body[m] for m in groups[j]) / max(tot, 1e-300))
        out_s.append(tot)
    return torch.stack(out_x), torch.stack(out_s)


def ref_pitome(x, k, sizes, r, protect, margin):
    metric = k.mean(0)[protect:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    body, s = x[protect:], sizes[protect:]
    t = len(body)
    sim = metric @ metric.T
    energy = [float(F.elu(sim[i] - margin).mean()) + (1e4 if s[i] <= 0 else 0.0) for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])
    a, b, keep = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
    groups = {j: [j] for j in b}
    for i in a:
        groups[max(b, key=lambda j: float(sim[i, j]))].append(i)
    out_x, out_s = [x[p] for p in range(protect)], [sizes[p] for p in range(protect)]
    for i in keep:
        out_x.append(body[i]), out_s.append(s[i])
    for j in b:
        tot = sum(s[m] for m in groups[j])
        out_x.append(sum(s[m] * body[m] for m in groups[j]) / tot)
        out_s.append(tot)
    return torch.stack(out_x), torch.stack(out_s)


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
