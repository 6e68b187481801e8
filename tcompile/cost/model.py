"""Latency prediction from graph costs and a device profile, plus the project's timing helper.

Why a roofline: a node is either compute-bound (FLOPs / rate) or memory-bound (bytes /
bandwidth); the larger of the two is a robust first-order estimate that needs no per-kernel
benchmarks, so the planner can compare rewrites it never ran. Each executed op also pays a
fixed overhead (``DeviceProfile.op_overhead``): in an FX GraphModule run eagerly, Python and
dispatcher costs of a few microseconds per node dominate small models, and a rewrite that saves
FLOPs but adds many small ops can be slower -- the model must see that.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.fx as fx

from tcompile.cost.flops import KINDS, NodeCost, call_nodes, graph_cost
from tcompile.cost.probe import probe_seconds

if TYPE_CHECKING:
    from tcompile.cost.profile import DeviceProfile

#: Share of the per-op overhead an aliasing op pays. Measured on this project's CPU machine
#: (torch 2.13, an FX chain of 100 nodes): aten.view/transpose ~6.7-7.0 us, aten.alias ~4.4 us,
#: aten.sym_size ~3.8 us against aten.add on one element ~6.5 us; views go through the same
#: dispatcher, so they are far from free in eager mode.
VIEW_OVERHEAD_FRACTION = 0.75


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the key of ``DeviceProfile.matmul_flops``."""
    return str(dtype).removeprefix("torch.")


def _resolve(profile: DeviceProfile | str) -> DeviceProfile:
    from tcompile.cost.profile import get_profile  # profile.py imports measure_latency from here

    return get_profile(profile)


def predict_node_seconds(cost: NodeCost, dtype: str, profile: DeviceProfile | str) -> float:
    """Roofline time of one node plus its fixed per-op overhead.

    Matmuls run at the dtype's matmul rate (falling back to float32's when the profile has no
    figure for ``dtype``), fused attention at the profile's attention rate and tcompile's sparse
    attention at its sparse rate (each falling back to the matmul rate when not measured),
    everything else at the elementwise rate. A matmul's bytes move at the profile's measured
    weight-streaming rate (what bounds a one-row matmul), other bytes at its copy bandwidth.
    A node with a probe is timed instead, when the profile was measured on this host.
    """
    p = _resolve(profile)
    if cost.probe is not None and p.runs_here():
        return probe_seconds(cost.probe, p) + p.op_overhead
    rate = {"matmul": p.matmul_rate, "attention": p.attention_rate,
            "sparse_attention": p.sparse_attention_rate}.get(cost.kind, lambda _: p.elementwise_flops)(dtype)
    compute = cost.flops / rate if cost.flops else 0.0
    bandwidth = p.weight_bandwidth() if cost.kind == "matmul" else p.mem_bandwidth
    memory = cost.bytes / bandwidth if cost.bytes else 0.0
    share = VIEW_OVERHEAD_FRACTION if cost.kind == "view" else 1.0
    return max(compute, memory) + p.op_overhead * cost.ops * share


def node_dtype(node: fx.Node) -> str:
    """The dtype a node computes in: its first floating output, else its first floating input.

    Why the fallback: comparisons and index ops output bool/int while their work is float.
    """
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    for val in vals:
        for t in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                return dtype_name(t.dtype)
    return "float32"


def _node_seconds(gm: fx.GraphModule | torch.export.ExportedProgram, profile: DeviceProfile | str,
                  sizes: Mapping[str, int] | None) -> list[tuple[str, float]]:
    gm = getattr(gm, "graph_module", gm)
    p = _resolve(profile)
    by_name = dict(call_nodes(gm))
    return [(c.kind, predict_node_seconds(c, node_dtype(by_name[name]), p))
            for name, c in graph_cost(gm, sizes).nodes]


def predict_latency(gm: fx.GraphModule | torch.export.ExportedProgram, profile: DeviceProfile | str,
                    sizes: Mapping[str, int] | None = None) -> float:
    """Predicted seconds for one eager run of ``gm`` (nodes run one after another)."""
    return math.fsum(s for _, s in _node_seconds(gm, profile, sizes))


def predict_breakdown(gm: fx.GraphModule | torch.export.ExportedProgram,
                      profile: DeviceProfile | str,
                      sizes: Mapping[str, int] | None = None) -> dict[str, float]:
    """Predicted seconds per node kind (every kind in KINDS present); sums to predict_latency."""
    out = dict.fromkeys(KINDS, 0.0)
    for kind, seconds in _node_seconds(gm, profile, sizes):
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def _sync() -> None:
    """Wait for queued CUDA work, so wall time covers it; never initialises CUDA itself."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                    max_seconds: float | None = None) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones.

    The project's one timing helper, so every figure (benchmarks, calibration, reports) is taken
    the same way: ``time.perf_counter`` around each call, under ``torch.no_grad``, with pending
    CUDA work synchronised. ``max_seconds`` bounds the whole measurement (warmup included): no
    call starts that would, at the pace so far, end past it; one timed call always runs.
    Returns ``{"median", "min", "max", "mean", "times", "repeats"}`` in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    start = time.perf_counter()
    last = 0.0  # duration of the latest call: the forecast for the next one

    def spent() -> bool:
        return max_seconds is not None and time.perf_counter() - start + last > max_seconds

    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            if spent():
                break
            t0 = time.perf_counter()
            fn()
            _sync()
            last = time.perf_counter() - t0
        while len(times) < repeats and not (times and spent()):
            t0 = time.perf_counter()
            fn()
            _sync()
            last = time.perf_counter() - t0
            times.append(last)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "mean": statistics.fmean(times), "times": times, "repeats": len(times)}


def _block_graph(blocks: int, d: int = 8, heads: int = 2) -> tuple[fx.GraphModule, float]:
    """Tiny transformer blocks (layer_norm, linear, view/transpose, sdpa, reshape, add, gelu) as
    an FX graph, and their node count in overhead units (a view counts VIEW_OVERHEAD_FRACTION)."""
    aten, g = torch.ops.aten, fx.Graph()
    cur, w, b = (g.placeholder(name) for name in ("x", "w", "b"))

    def op(target: Any, *args: Any) -> fx.Node:
        return g.call_function(target, args)

    for _ in range(blocks):
        q = op(aten.linear.default, op(aten.layer_norm.default, cur, [d], b, b), w, b)
        t = op(aten.transpose.int, op(aten.view.default, q, [1, 1, heads, d // heads]), 1, 2)
        a = op(aten.transpose.int, op(aten.scaled_dot_product_attention.default, t, t, t), 1, 2)
        o = op(aten.linear.default, op(aten.reshape.default, a, [1, 1, d]), w, b)
        cur = op(aten.add.Tensor, o, cur)
        cur = op(aten.add.Tensor, op(aten.gelu.default, cur), cur)
    g.output(cur)
    return fx.GraphModule(torch.nn.Module(), g), blocks * (7 + 4 * VIEW_OVERHEAD_FRACTION)


def measure_op_overhead(device: str | torch.device = "cpu", max_seconds: float = 0.5) -> float:
    """Seconds of fixed cost per op of an FX GraphModule run eagerly on ``device``.

    Why a mix of transformer ops on tiny tensors rather than a chain of one-element adds: real
    nodes parse more arguments and allocate outputs. On this project's 2-core CPU an add chain
    ran at ~6 us/node, this mix at ~20, and an exported tiny ViT at ~22; on an H200 host the add
    chain gave 12.5 us/node where ViT-B at batch 1 spent 18-28 us per node.
    """
    gm, units = _block_graph(8)
    dev = torch.device(device)
    x, w, b = (torch.randn(*shape, device=dev) for shape in ((1, 1, 8), (8, 8), (8,)))
    with torch.no_grad():
        gm(x, w, b)  # first call: lazy library initialisation, never timed
    timing = measure_latency(lambda: gm(x, w, b), repeats=50, warmup=1, max_seconds=max_seconds)
    return timing["min"] / units  # the fastest run: see profile._best_seconds
