"""The per-op table of a report: where the optimized model spends its time, from torch.profiler.

Why it is in the report: a plan's predicted and measured totals say *whether* it is faster; the
op table says *where* the time goes (e.g. a sparse attention op that costs more than the dense
matmuls it saves), which is what a user reads before choosing another backend or budget.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def profile_ops(fn: Callable[[], Any], top: int = 15) -> list[dict[str, Any]]:
    """Run ``fn`` once under torch.profiler; the ``top`` ops by self time (device time on CUDA):
    ``{"op", "calls", "self_ms", "share"}`` with ``share`` of the profiled total."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        fn()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]

    def self_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    rows = sorted(events, key=self_us, reverse=True)[:top]
    return [{"op": e.key, "calls": int(e.count), "self_ms": self_us(e) / 1e3, "share": self_us(e) / total}
            for e in rows]
