"""The analytic cost model: FLOPs and bytes per graph node, device profiles, predicted latency.

Why it exists: the planner chooses among token-reduction rewrites by predicted cost, without
running each candidate; ``measure_latency`` is the project's one timing helper, used to check
those predictions against reality.
"""
from tcompile.cost.flops import (
    KINDS,
    GraphCost,
    NodeCost,
    SizeResolver,
    by_kind,
    call_nodes,
    dynamic_symbols,
    graph_cost,
    node_cost,
    op_name,
)
from tcompile.cost.model import (
    dtype_name,
    measure_latency,
    measure_op_overhead,
    node_dtype,
    predict_breakdown,
    predict_latency,
    predict_node_seconds,
)
from tcompile.cost.profile import (
    DATASHEETS,
    TARGETS,
    DeviceProfile,
    cpu_profile,
    cpu_profile_path,
    get_profile,
    measure_cpu_profile,
    measure_cuda_profile,
)
from tcompile.cost.validation import Validation, spearman, validate

__all__ = [
    "DATASHEETS", "KINDS", "TARGETS", "DeviceProfile", "GraphCost", "NodeCost", "SizeResolver",
    "by_kind", "call_nodes", "cpu_profile", "cpu_profile_path", "dtype_name", "dynamic_symbols",
    "get_profile", "graph_cost", "measure_cpu_profile", "measure_cuda_profile", "measure_latency",
    "measure_op_overhead", "node_cost", "node_dtype", "op_name", "predict_breakdown",
    "predict_latency", "predict_node_seconds", "Validation", "spearman", "validate",
]
