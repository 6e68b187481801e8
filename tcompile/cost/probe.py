"""Op probes: a node whose time no roofline describes is timed on the device, once per shape.

Why: tcompile's CPU sparse prefill attention is a Python loop over the tiles its pattern
estimate picks (``tcompile.passes.sparse_ops``); its time depends on how those tiles fall (at
1,024 tokens, vertical_slash at density 0.05 ran as slow as at 0.3, and 0.5 twice as slow as
0.4), so FLOPs at a rate plus a per-op count mis-ranked it against dense SDPA, and the rate
fitted at one shape swung 17-28 GFLOP/s between profile runs. The remedy TensorRT's tactic
timing and Inductor's autotuning use: time the op itself at the node's shapes, on random
inputs, and cache the figure. Only a profile measured on this host is probed
(:meth:`DeviceProfile.runs_here`); datasheet profiles and profiles of other machines keep the
analytic rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from tcompile.cost.profile import DeviceProfile

#: Timed calls per probe after one untimed call; their median is kept. Not the fastest, as the
#: profile's rate probes keep: the sparse op's calls are bimodal (vertical_slash at 1,024 tokens,
#: density 0.5: 42-88 ms over 12 calls), and the graph runs at its typical time, not its best.
PROBE_REPEATS = 7


@dataclass(frozen=True)
class TensorSpec:
    """A probe input: random normal values of this shape and dtype on the profile's device."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Probe:
    """``target(*args)`` with each :class:`TensorSpec` replaced by a tensor: a hashable call
    that reproduces one node's work (the cache key of its timing)."""

    target: Callable[..., Any]
    args: tuple[Any, ...]

    def call(self, device: torch.device) -> Callable[[], Any]:
        """The probe as a no-argument call, its inputs made once (seeded, so repeatable)."""
        g = torch.Generator().manual_seed(0)
        args = [torch.randn(a.shape, generator=g, dtype=torch.float32).to(device=device, dtype=a.dtype)
                if isinstance(a, TensorSpec) else a for a in self.args]
        return lambda: self.target(*args)


_TIMES: dict[tuple[str, str, Probe], float] = {}   # (profile name, measured_at, probe) -> seconds


def probe_seconds(probe: Probe, profile: DeviceProfile) -> float:
    """Seconds one call of ``probe`` takes on ``profile``'s device (timed once per process)."""
    from tcompile.cost.model import measure_latency

    key = (profile.name, profile.measured_at, probe)
    if key not in _TIMES:
        device = torch.device("cuda" if profile.kind == "cuda" else "cpu")
        timing = measure_latency(probe.call(device), repeats=PROBE_REPEATS, warmup=1)
        _TIMES[key] = timing["median"]
    return _TIMES[key]
