"""Helpers shared by the benchmark scripts: interleaved timing and result files.

Timings on a shared 2-core machine drift, so configurations are timed in interleaved rounds
(one call of each per round) and compared as ratios of medians taken in the same run.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from tcompile.cost import measure_latency

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Median seconds per call of each function, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            with torch.no_grad():
                fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure_latency(fn, repeats=1, warmup=0)["median"])
    return {k: {"median": statistics.median(v), "times": v} for k, v in times.items()}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return "unknown"


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float) + "\n")
    return path
