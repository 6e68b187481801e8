"""The causal-LM planner (issue 6): acceptance simulation, search logic, budgets and bad input.

Timing is never asserted here: the search tests replace the workload clock with a fixed cost
per plan (``_run``), so what is checked is the planner's logic; the measured figures on
SmolLM2 are bench/planner_budget.py's.
"""
from __future__ import annotations

import pytest
import torch

import tcompile
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.draft_simulation import simulate_acceptance
from tcompile.runtime.lm_optimize import runtime_for
from tcompile.runtime.lm_planner import LMPlanner, Workload
from tcompile.runtime.speculative_build import make_drafter


@pytest.fixture(scope="module")
def verify_program(llama):
    return capture_lm(llama, verify=True)


def _text(tokens: int = 160, period: int = 24, seed: int = 0) -> torch.Tensor:
    """A repetitive text: prompt lookup finds its n-grams, as in copy or editing tasks."""
    base = torch.randint(0, 128, (period,), generator=torch.Generator().manual_seed(seed))
    return base.repeat(tokens // period + 1)[:tokens]


@pytest.mark.parametrize("options", [{"drafter": "prompt_lookup", "k": 4},
                                     {"drafter": "prompt_lookup", "k": 6, "branches": 3}])
def test_simulated_acceptance_equals_the_real_loop(verify_program, llama, options):
    """Greedy verification accepts exactly the drafts that match the target's greedy output, so
    replaying the drafter over the plain greedy continuation gives the real loop's step count."""
    prompt = _text(80)
    spec = PassSpec.make("speculative", **options)
    plain, _ = runtime_for(verify_program, [])
    fast, _ = runtime_for(verify_program, [spec], llama)
    new = 40
    generated = plain.generate(prompt[None], max_new_tokens=new, eos_token_id=[])[0, prompt.numel():]
    out = fast.generate(prompt[None], max_new_tokens=new, eos_token_id=[])
    assert torch.equal(out[0, prompt.numel():], generated)
    per_step, _ = simulate_acceptance(make_drafter(spec.options, verify_program.spec, None), prompt, generated,
                                      spec.options.k)
    assert fast.last_stats.steps > 0
    assert per_step == pytest.approx((new - 1) / fast.last_stats.steps)


def _fixed_clock(monkeypatch, costs: dict[str, float]) -> None:
    """Replace the workload clock: a plan costs the product of its passes' factors (1.0 each by
    default), the unoptimized model 1.0; generation itself still runs."""
    from tcompile.runtime import lm_planner

    real = lm_planner.LMPlanner._run

    def run(self, runtime):
        _, outs = real(self, runtime)
        factor = 1.0
        for name, cost in costs.items():
            if getattr(runtime, "_tag", "").count(name):
                factor *= cost
        return factor, outs
    monkeypatch.setattr(lm_planner.LMPlanner, "_run", run)


def _planner(program, model, budget, texts, **kw) -> LMPlanner:
    def build(specs):
        runtime, _ = runtime_for(program, specs, model)
        runtime._tag = " ".join(s.name for s in specs)
        return runtime
    return LMPlanner(program, tcompile.Budget.parse(budget), Workload(texts, new_tokens=24), build, **kw)


def test_planner_chooses_the_lossless_plan_that_meets_the_budget(verify_program, llama, monkeypatch):
    _fixed_clock(monkeypatch, {"speculative": 0.5, "kv_": 0.9})
    plan = _planner(verify_program, llama, "latency=0.6,quality=0.9", [_text(), _text(seed=1)]).plan()
    chosen = [c for c in plan.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].pipeline.startswith("speculative")
    assert chosen[0].measured_latency_ratio == pytest.approx(0.5) and chosen[0].fidelity == 1.0
    assert [s.name for s in plan.specs] == ["speculative"]
    for c in plan.candidates:      # priced, or said why not (a more aggressive setting priced above the budget)
        assert c.predicted_latency_ratio is not None or c.note.startswith(("not applicable", "not priced"))
    assert any(c.note.startswith("not priced: the more aggressive kv_streaming") for c in plan.candidates)
    assert any(n.startswith("speculative: chosen") for n in plan.notes)
    assert any(n.startswith("kv_eviction:") for n in plan.notes)


def test_planner_composes_families_when_no_single_plan_meets_the_budget(verify_program, llama, monkeypatch):
    _fixed_clock(monkeypatch, {"speculative": 0.8, "kv_": 0.7})
    planner = _planner(verify_program, llama, "latency=0.6,quality=0.0", [_text()])
    planner.predicted_ratio = lambda specs: 0.5          # every plan looks promising to the model
    plan = planner.plan()
    names = sorted(s.name for s in plan.specs)
    assert len(names) == 2 and "speculative" in names and names[0].startswith("kv_")
    chosen = next(c for c in plan.candidates if c.chosen)
    assert chosen.measured_latency_ratio == pytest.approx(0.56) and "composed" in chosen.note


def test_unreachable_latency_budget_names_the_best_point(verify_program, llama, monkeypatch):
    _fixed_clock(monkeypatch, {"speculative": 0.8})
    with pytest.raises(tcompile.BudgetUnreachableError, match="no plan meets budget latency=0.1") as info:
        _planner(verify_program, llama, "latency=0.1,quality=0.99", [_text()]).plan()
    assert info.value.best["pipeline"].startswith("speculative")
    assert info.value.best["latency_ratio"] == pytest.approx(0.8)


def test_time_limit_bounds_the_search(verify_program, llama):
    planner = _planner(verify_program, llama, "latency=0.6", [_text()], time_limit=1e-6)
    with pytest.raises(tcompile.BudgetUnreachableError, match="no plan could be measured"):
        planner.plan()
    with pytest.raises(ValueError, match="time_limit"):
        _planner(verify_program, llama, "latency=0.6", [_text()], time_limit=0)


def test_a_plan_is_timed_in_the_rounds_that_fit_before_the_deadline(verify_program, llama, monkeypatch):
    """Near the deadline a plan is timed in fewer rounds (noted), not skipped; with no time for
    one round it is not measured."""
    import time

    from tcompile.runtime.lm_planner import LMCandidate
    _fixed_clock(monkeypatch, {"speculative": 0.5})
    planner = _planner(verify_program, llama, "latency=0.6", [_text()], rounds=3)
    planner.workload_s = 10.0
    cand = LMCandidate([PassSpec.make("speculative")], predicted=0.5)
    planner.deadline = time.monotonic() + 1000
    assert planner.rounds_that_fit(cand) == 3
    planner.deadline = time.monotonic() + 10 * (1 + 1 * 1.5) + 5     # agreement + one round, not two
    assert planner.rounds_that_fit(cand) == 1
    assert planner._measure_in_time(cand) and cand.measured == pytest.approx(0.5)
    assert "timed in 1 of 3 rounds" in cand.note
    planner.deadline = time.monotonic() + 10
    assert planner.rounds_that_fit(cand) == 0 and not planner._measure_in_time(LMCandidate(cand.specs, 0.5))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"budget": "latency=0.6"}, tcompile.TCompileError, "needs calibration text"),
    ({"budget": "memory=0.5", "calibration": [torch.arange(100)]}, tcompile.BudgetError, "not planned"),
    ({"budget": "latency=0.6", "calibration": [torch.arange(100)], "new_tokens": 1}, ValueError, "new_tokens"),
    ({"budget": "latency=0.6", "calibration": []}, ValueError, "calibration is empty"),
])
def test_bad_lm_budgets_and_options(llama, kwargs, error, message):
    with pytest.raises(error, match=message):
        tcompile.optimize(llama, **kwargs)
