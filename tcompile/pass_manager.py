"""The pass manager: runs a pipeline of registered passes over a Program, one verified step at a time.

After each pass that reports a change the graph is linted, recompiled and shape-propagated, and
cached analyses are invalidated. Exact passes are checked numerically against the previous graph;
lossy passes get their fidelity recorded. Instruments observe every step (timing, statistics,
IR dumps) and the report renders their records. An error inside a pass names the pass and the
passes that ran before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch.fx.passes.infra.pass_base import PassResult

from tcompile.analysis.attention import analyze_attention
from tcompile.analysis.shapes import propagate_shapes
from tcompile.errors import PassFailedError, TCompileError, VerificationError
from tcompile.fidelity import max_abs_error, output_cosine, token_mask_of
from tcompile.program import Program
from tcompile.registry import PassSpec, format_spec, get_pass
from tcompile.report import PassRecord

log = logging.getLogger(__name__)


class PassSkipped(Exception):
    """Raised by a pass that cannot apply to this graph; the reason lands in the report."""


@dataclass
class PassContext:
    """Run-wide settings plus the state of the pass being run (its options, its statistics)."""

    program: Program
    options: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    target: str = "cpu"
    pass_index: int = 0


class Instrument(Protocol):
    def after_pass(self, spec: PassSpec, program: Program, record: PassRecord) -> None: ...


class IRDumpInstrument:
    """Write the graph's code after every pass that changed it (``--dump-ir DIR``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def after_pass(self, spec: PassSpec, program: Program, record: PassRecord) -> None:
        if record.status == "applied":
            self.directory.mkdir(parents=True, exist_ok=True)
            idx = len(list(self.directory.glob("*.py")))
            (self.directory / f"{idx:02d}_{spec.name}.py").write_text(program.gm.code)


def tokens_per_layer(program: Program) -> list[int]:
    return [s.q_tokens for s in analyze_attention(program).sites]


def graph_flops(program: Program) -> float:
    from tcompile.cost import graph_cost
    return float(graph_cost(program.gm).flops)


@dataclass
class PassManager:
    verify: bool = True
    exact_tolerance: float = 1e-4
    instruments: list[Instrument] = field(default_factory=list)
    target: str = "cpu"

    def run(self, program: Program, specs: list[PassSpec]) -> tuple[Program, list[PassRecord]]:
        """Apply ``specs`` in order to a clone of ``program``; the input program is never modified."""
        current = program.clone()
        records: list[PassRecord] = []
        reference = current.run() if self.verify and specs else None
        for index, spec in enumerate(specs):
            record, current, reference = self._run_one(index, spec, current, specs[:index], reference)
            records.append(record)
            for inst in self.instruments:
                inst.after_pass(spec, current, record)
        return current, records

    def _run_one(self, index: int, spec: PassSpec, program: Program, before: list[PassSpec],
                 reference: Any) -> tuple[PassRecord, Program, Any]:
        info = get_pass(spec.name)
        text = format_spec(spec)
        tokens_before, flops_before = tokens_per_layer(program), graph_flops(program)
        candidate = program.clone()
        ctx = PassContext(candidate, spec.options, {}, self.target, index)
        started = time.perf_counter()
        try:
            result: PassResult = info.fn(candidate.gm, ctx)
        except PassSkipped as skip:
            log.info("pass %s skipped: %s", text, skip)
            return PassRecord(spec.name, text, "skipped", reason=str(skip), exact=info.exact,
                              seconds=time.perf_counter() - started, tokens_before=tokens_before,
                              tokens_after=tokens_before, flops_before=flops_before,
                              flops_after=flops_before), program, reference
        except TCompileError:
            raise
        except Exception as exc:
            raise PassFailedError(_where(text, before) + f": {type(exc).__name__}: {exc}") from exc
        if result.modified:
            try:
                candidate.gm = result.graph_module
                candidate.gm.graph.lint()
                candidate.gm.recompile()
                candidate.invalidate()
                propagate_shapes(candidate)
            except Exception as exc:
                raise PassFailedError(_where(text, before) + f" produced an invalid graph: {exc}") from exc
        seconds = time.perf_counter() - started
        applied = result.modified or bool(ctx.stats.get("runtime"))   # e.g. a KV policy the runtime applies
        record = PassRecord(spec.name, text, "applied" if applied else "skipped",
                            reason=None if applied else "the pass found nothing to change",
                            exact=info.exact, seconds=seconds, stats=dict(ctx.stats),
                            tokens_before=tokens_before, tokens_after=tokens_per_layer(candidate),
                            flops_before=flops_before, flops_after=graph_flops(candidate))
        if self.verify and result.modified:
            outputs = candidate.run()
            if info.exact:
                err = max_abs_error(reference, outputs)
                record.max_abs_error = err
                if not err <= self.exact_tolerance:
                    raise VerificationError(f"{_where(text, before)} is declared exact but changed outputs "
                                            f"by {err:.3g} (> {self.exact_tolerance:g})")
            else:
                record.fidelity = output_cosine(reference, outputs,
                                                token_mask=token_mask_of(candidate.example_kwargs))
            reference = outputs
        log.info("pass %s: %s in %.3fs", text, record.status, seconds)
        return record, candidate, reference


def _where(text: str, before: list[PassSpec]) -> str:
    prior = ", ".join(format_spec(s) for s in before) or "none"
    return f"pass {text} (after: {prior})"
