"""The custom ops survive torch.export as single nodes and the exported programs run on CPU."""
from __future__ import annotations

import torch

from kernel_helpers import qkv, rel_err
from tcompile.kernels.block_sparse_attention import block_sparse_attention_reference
from tcompile.kernels.token_merge import tome_match_reference
from tcompile.kernels.vertical_slash import vertical_slash_reference


class BlockSparse(torch.nn.Module):
    def forward(self, q, k, v, idx, cnt):
        return torch.ops.tcompile.block_sparse_attention(q, k, v, idx, cnt, 16, 0.25, True) * 2


class VerticalSlash(torch.nn.Module):
    def forward(self, q, k, v, vert, slash):
        return torch.ops.tcompile.vertical_slash_attention(q, k, v, vert, slash, 16, 0.25) + 1


class Match(torch.nn.Module):
    def forward(self, a, b, pad):
        return torch.ops.tcompile.tome_match(a, b, pad, -1e4)


def _targets(ep: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_export_block_sparse(cpu_path):
    q, k, v = qkv(1, 4, 2, 37, 37, 16, torch.float32, torch.device("cpu"))
    idx = torch.tensor([0, 1, 2], dtype=torch.int32).expand(1, 4, 3, 3).contiguous()
    cnt = torch.tensor([1, 2, 3], dtype=torch.int32).expand(1, 4, 3).contiguous()
    ep = torch.export.export(BlockSparse(), (q, k, v, idx, cnt))
    assert "tcompile.block_sparse_attention.default" in _targets(ep)
    out = ep.module()(q, k, v, idx, cnt)
    assert rel_err(out, 2 * block_sparse_attention_reference(q, k, v, idx, cnt, 16, 0.25, True)) <= 1e-5


def test_export_vertical_slash(cpu_path):
    q, k, v = qkv(1, 4, 2, 37, 37, 16, torch.float32, torch.device("cpu"))
    vert = torch.tensor([0, 5, 30], dtype=torch.int32).expand(1, 4, 3).contiguous()
    slash = torch.tensor([0, 1, 17], dtype=torch.int32).expand(1, 4, 3).contiguous()
    ep = torch.export.export(VerticalSlash(), (q, k, v, vert, slash))
    assert "tcompile.vertical_slash_attention.default" in _targets(ep)
    out = ep.module()(q, k, v, vert, slash)
    assert rel_err(out, vertical_slash_reference(q, k, v, vert, slash, 16, 0.25) + 1) <= 1e-5


def test_export_tome_match(cpu_path):
    a, b = torch.randn(2, 9, 16), torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    ep = torch.export.export(Match(), (a, b, pad))
    assert "tcompile.tome_match.default" in _targets(ep)
    got, want = ep.module()(a, b, pad), tome_match_reference(a, b, pad, -1e4)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])
