"""What each backend can take: the ops of a rewritten graph it runs, runs outside, or refuses.

A backend either runs an op inside its engine, runs it outside the engine (a *fallback*: a
PyTorch partition for TensorRT, an opaque extern call inside Inductor's code) or cannot take it
at all (*unsupported*: ONNX has no translation for tcompile's ``torch.library`` ops, so such a
graph cannot be exported). :func:`assess` applies one backend's rule to a graph and counts the
engine partitions that the fallbacks cut it into; the report shows the result and ``lower``
refuses an unsupported graph before any export work, naming the op and the alternatives.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from tcompile import _compat

# op-name rules per backend: "engine" | "fallback" | "unsupported"
Rule = Callable[[str], str]


def _aten_or_fallback(name: str) -> str:
    return "engine" if name.startswith(("aten::", "prims::")) else "fallback"


def _aten_or_unsupported(name: str) -> str:
    return "engine" if name.startswith(("aten::", "prims::")) else "unsupported"


RULES: dict[str, Rule] = {
    "eager": lambda name: "engine",            # PyTorch runs everything
    "inductor": _aten_or_fallback,             # custom ops become extern kernel calls
    "aot": _aten_or_fallback,                  # the same, through AOTInductor's proxy executor
    "onnxruntime": _aten_or_unsupported,       # torch.onnx has no translation for tcompile:: ops
    "tensorrt": _aten_or_fallback,             # torch-tensorrt partitions them out to PyTorch
}


@dataclass
class Capability:
    """One backend's verdict on one graph."""

    backend: str
    engine_ops: int = 0                                    # op nodes the engine runs
    fallbacks: list[str] = field(default_factory=list)     # ops run outside the engine
    unsupported: list[str] = field(default_factory=list)   # ops that block lowering
    partitions: int = 0                                    # engine segments cut by fallbacks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.engine_ops} ops in {self.partitions} engine partition(s)"]
        if self.fallbacks:
            parts.append(f"run outside the engine: {', '.join(self.fallbacks)}")
        if self.unsupported:
            parts.append(f"unsupported: {', '.join(self.unsupported)}")
        return f"{self.backend}: " + "; ".join(parts)


def assess(backend: str, gm: torch.fx.GraphModule) -> Capability:
    """Classify every op node of ``gm`` by ``backend``'s rule.

    Python-function nodes inserted by passes are traced into aten ops when the graph is
    re-exported, so they count as engine ops here; only ``torch.library`` custom ops can fall back.
    """
    rule = RULES.get(backend, _aten_or_fallback)
    cap = Capability(backend)
    in_engine = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _compat.op_name(node.target)
        verdict = "engine" if name is None else rule(name)
        if verdict == "engine":
            cap.engine_ops += 1
            cap.partitions += not in_engine
            in_engine = True
            continue
        in_engine = False
        bucket = cap.fallbacks if verdict == "fallback" else cap.unsupported
        if name not in bucket:
            bucket.append(name)
    return cap
