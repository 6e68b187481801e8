"""Program: a captured model's graph plus the analyses passes and the cost model read.

Analyses are cached by name and invalidated whenever a pass reports that it modified the graph
(MLIR's analysis manager): the cost model reads them and never re-traces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from tcompile import _compat as compat


@dataclass
class Program:
    """A captured model: an unlifted ``torch.export`` GraphModule and its example inputs."""

    gm: torch.fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    model_name: str = "model"
    info: dict[str, Any] = field(default_factory=dict)  # model kind, config facts, capture options
    _analyses: dict[str, Any] = field(default_factory=dict, repr=False)

    def flat_inputs(self) -> list[Any]:
        return compat.tree_flatten((self.example_args, self.example_kwargs))[0]

    def run(self, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        """Run the graph on the example inputs (or the given ones) without autograd."""
        with torch.no_grad():
            return self.gm(*(self.example_args if args is None else args),
                           **(self.example_kwargs if kwargs is None else kwargs))

    def analysis(self, name: str, compute: Callable[["Program"], Any]) -> Any:
        """The cached result of an analysis, computing it on first use after a change."""
        if name not in self._analyses:
            self._analyses[name] = compute(self)
        return self._analyses[name]

    def invalidate(self) -> None:
        """Forget every cached analysis; call after the graph changed."""
        self._analyses.clear()

    def clone(self) -> "Program":
        """A copy whose graph can be rewritten without touching this one (parameters are shared)."""
        return Program(compat.clone_graph_module(self.gm), self.example_args, self.example_kwargs,
                       self.model_name, dict(self.info))
