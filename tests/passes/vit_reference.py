"""A float64 ViT forward written directly in PyTorch, with the reference reducers inserted.

Independent of tcompile's graph machinery: it walks transformers' ViT modules, computes
attention by hand (with ToMe's log-size bias) and calls the loop references per example.
"""
from __future__ import annotations

import copy
import math

import torch

from reference import ref_evit, ref_pitome, ref_tome


def _heads(t, h):
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


@torch.no_grad()
def ref_vit(model, pixel_values, removals, method="tome", prop_attn=True, fuse=False, margins=None, metric="keys"):
    """``removals[l]``: tokens merged (tome/pitome) or the keep count (evit) after layer l's attention;
    ``metric``: merge similarity on the keys or on the hidden states after attention."""
    m = copy.deepcopy(model).double()
    h_count = m.config.num_attention_heads
    x = m.vit.embeddings(pixel_values.double())
    sizes = torch.ones(x.shape[0], x.shape[1], dtype=torch.float64)
    reduced = False
    for layer_idx, layer in enumerate(m.vit.layers):
        a = layer.attention
        hn = layer.layernorm_before(x)
        q, k, v = (_heads(p(hn), h_count) for p in (a.q_proj, a.k_proj, a.v_proj))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if reduced and prop_attn:
            logits = logits + sizes.log()[:, None, None, :]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + a.o_proj(out)
        amount = removals[layer_idx] if layer_idx < len(removals) else 0
        if amount:
            rows = []
            for b in range(x.shape[0]):
                feat = k[b] if metric == "keys" else x[b].unsqueeze(0)
                if method == "tome":
                    rows.append(ref_tome(x[b], feat, sizes[b], amount, 1))
                elif method == "pitome":
                    rows.append(ref_pitome(x[b], feat, sizes[b], amount, 1, margins[layer_idx]))
                else:
                    rows.append(ref_evit(x[b], q[b], k[b], sizes[b], amount, 1, fuse))
            x = torch.stack([r[0] for r in rows])
            sizes = torch.stack([r[1] for r in rows])
            reduced = True
        x = x + layer.mlp(layer.layernorm_after(x))
    return m.classifier(m.vit.layernorm(x)[:, 0])
