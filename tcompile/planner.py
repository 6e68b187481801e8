"""The planner, first version: choose pass options that meet a budget, by cost model then measurement.

For each token-reduction candidate family (ToMe, PiToMe, EViT pruning) it searches the least
aggressive setting whose *predicted* cost meets every cost field of the budget (FLOPs ratio from
the analytic FLOPs of the rewritten graph, latency ratio from the roofline cost model over a
measured device profile), then measures fidelity on calibration data, keeps the candidates that
meet ``budget.quality`` and picks the best. A latency budget is then checked by measuring; when
the measured ratio misses, the planner steps to a more aggressive setting. An unreachable budget
raises :class:`BudgetUnreachableError` with the best reachable figures.

Candidate families are data (``CANDIDATE_FAMILIES``); later families (KV eviction, sparse
attention, speculation) add entries rather than branches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tcompile.analysis.attention import per_token_outputs, require_attention
from tcompile.budget import Budget
from tcompile.cost import graph_cost, predict_latency
from tcompile.errors import BudgetUnreachableError, TCompileError
from tcompile.pass_manager import PassManager
from tcompile.program import Program
from tcompile.registry import PassSpec, format_pipeline
from tcompile.report import CandidateRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A knob family: maps an aggressiveness level (int, 1..max_level) to a pipeline."""

    name: str
    levels: Callable[[Program], int]
    specs: Callable[[Program, int], list[PassSpec]]


def _merge_levels(program: Program) -> int:
    """Levels count total merges, so the search can land between two constant schedules."""
    a = require_attention(program)
    return len(a.sites) * ((a.sites[0].q_tokens - a.leading_special) // 2)


def _merge_schedule(program: Program, level: int) -> dict[str, object]:
    """``level`` merges spread over the layers, one more in the earlier layers when uneven."""
    layers = len(require_attention(program).sites)
    base, extra = divmod(level, layers)
    if extra == 0:
        return {"r": base}
    return {"layers": tuple(base + (1 if i < extra else 0) for i in range(layers))}


def _prune_levels(program: Program) -> int:
    return 19  # keep ratio 0.95 .. 0.05 in steps of 0.05


CANDIDATE_FAMILIES: list[Family] = [
    Family("token_merging{method=tome}", _merge_levels,
           lambda p, lv: [PassSpec.make("token_merging", **_merge_schedule(p, lv))]),
    Family("token_merging{metric=hidden}", _merge_levels,
           lambda p, lv: [PassSpec.make("token_merging", metric="hidden", **_merge_schedule(p, lv))]),
    Family("token_merging{method=pitome}", _merge_levels,
           lambda p, lv: [PassSpec.make("token_merging", method="pitome", **_merge_schedule(p, lv))]),
    Family("token_pruning", _prune_levels,
           lambda p, lv: [PassSpec.make("token_pruning", keep=round(1.0 - 0.05 * lv, 2),
                                        fuse=bool(per_token_outputs(p)))]),
]


@dataclass
class Evaluation:
    specs: list[PassSpec]
    program: Program
    flops_ratio: float
    predicted_latency_ratio: float
    fidelity: float | None = None
    measured_latency_ratio: float | None = None


@dataclass
class PlanResult:
    specs: list[PassSpec]
    candidates: list[CandidateRecord]
    notes: list[str] = field(default_factory=list)


class Planner:
    def __init__(self, program: Program, budget: Budget | None, profile: Any,
                 fidelity_fn: Callable[[Program], float], latency_fn: Callable[[Program], float],
                 time_limit: float = 600.0) -> None:
        self.program, self.budget, self.profile = program, budget, profile
        self.fidelity_fn, self.latency_fn = fidelity_fn, latency_fn
        self.deadline = time.monotonic() + time_limit
        self.base_flops = graph_cost(program.gm).flops
        self.base_pred = predict_latency(program.gm, profile)
        self._cache: dict[str, Evaluation | None] = {}

    def evaluate(self, specs: list[PassSpec]) -> Evaluation | None:
        key = format_pipeline(specs)
        if key not in self._cache:
            try:
                prog, records = PassManager(verify=False).run(self.program, specs)
            except TCompileError as exc:
                log.info("candidate %s failed: %s", key, exc)
                self._cache[key] = None
                return None
            if any(r.status != "applied" for r in records):
                self._cache[key] = None
                return None
            self._cache[key] = Evaluation(specs, prog, graph_cost(prog.gm).flops / self.base_flops,
                                          predict_latency(prog.gm, self.profile) / self.base_pred)
        return self._cache[key]

    def _meets_cost(self, ev: Evaluation) -> bool:
        b = self.budget
        return ((b.flops is None or ev.flops_ratio <= b.flops)
                and (b.latency is None or (ev.measured_latency_ratio or ev.predicted_latency_ratio) <= b.latency))

    def _least_aggressive(self, family: Family) -> Evaluation | None:
        """Binary search over levels, using that cost falls as the level rises."""
        lo, hi, best = 1, family.levels(self.program), None
        while lo <= hi:
            mid = (lo + hi) // 2
            ev = self.evaluate(family.specs(self.program, mid))
            if ev is not None and self._meets_cost(ev):
                best, hi = (mid, ev), mid - 1
            else:
                lo = mid + 1
        if best is None:
            return None
        level, ev = best
        if self.budget.latency is not None:  # check the prediction against the clock, step up on a miss
            while time.monotonic() < self.deadline:
                ev.measured_latency_ratio = self.latency_fn(ev.program)
                if ev.measured_latency_ratio <= self.budget.latency or level >= family.levels(self.program):
                    break
                level += 1
                nxt = self.evaluate(family.specs(self.program, level))
                if nxt is None:
                    break
                ev = nxt
        return ev

    def plan(self) -> PlanResult:
        require_attention(self.program)
        records: list[CandidateRecord] = []
        found: list[tuple[Family, Evaluation]] = []
        for fam in CANDIDATE_FAMILIES:
            if time.monotonic() > self.deadline:
                records.append(CandidateRecord(fam.name, note="not tried: planner time limit reached"))
                continue
            ev = self._least_aggressive(fam)
            if ev is None:
                strongest = self.evaluate(fam.specs(self.program, fam.levels(self.program)))
                records.append(CandidateRecord(
                    fam.name, flops_ratio=strongest.flops_ratio if strongest else None,
                    predicted_latency_ratio=strongest.predicted_latency_ratio if strongest else None,
                    measured_latency_ratio=strongest.measured_latency_ratio if strongest else None,
                    note="rejected: cannot meet the cost budget even at its most aggressive setting"))
                continue
            ev.fidelity = self.fidelity_fn(ev.program)
            found.append((fam, ev))
            records.append(CandidateRecord(format_pipeline(ev.specs), ev.flops_ratio, ev.predicted_latency_ratio,
                                           ev.measured_latency_ratio, ev.fidelity, note=""))
        if not found:
            best = min((r for r in records if r.flops_ratio is not None), key=lambda r: r.flops_ratio, default=None)
            figures = {"flops_ratio": best.flops_ratio, "predicted_latency_ratio": best.predicted_latency_ratio,
                       "measured_latency_ratio": best.measured_latency_ratio} if best else {}
            raise BudgetUnreachableError(
                f"no plan meets budget {self.budget}: the most aggressive plan reaches "
                + (", ".join(f"{k}={v:.3f}" for k, v in figures.items() if v is not None) or "nothing")
                + "; relax the budget", best=figures)
        quality = self.budget.quality
        ok = [(f, e) for f, e in found if quality is None or e.fidelity >= quality]
        for rec, (fam, ev) in zip([r for r in records if r.fidelity is not None], found):
            if quality is not None and ev.fidelity < quality:
                rec.note = f"rejected: fidelity {ev.fidelity:.4f} < quality {quality:g}"
        if not ok:
            top = max(found, key=lambda fe: fe[1].fidelity)[1]
            raise BudgetUnreachableError(
                f"no plan meets budget {self.budget}: at the requested cost the best fidelity is "
                f"{top.fidelity:.4f} ({format_pipeline(top.specs)}, flops ratio {top.flops_ratio:.3f}); "
                "lower quality or raise the cost fields",
                best={"fidelity": top.fidelity, "flops_ratio": top.flops_ratio, "pipeline": format_pipeline(top.specs)})
        fam, chosen = max(ok, key=lambda fe: fe[1].fidelity)
        for rec in records:
            if rec.pipeline == format_pipeline(chosen.specs):
                rec.chosen, rec.note = True, "chosen: meets the cost budget with the best measured fidelity"
            elif not rec.note:
                rec.note = "meets the budget, lower fidelity than the chosen plan"
        return PlanResult(chosen.specs, records)
