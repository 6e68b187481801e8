"""``tcompile.optimize``: capture → plan → rewrite (verified) → lower → measure → report."""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from tcompile.analysis.attention import require_attention
from tcompile.artifact import versions
from tcompile.budget import Budget
from tcompile.errors import BackendUnavailableError, BudgetError, PassOptionError
from tcompile.capture import capture, normalize_inputs
from tcompile.cost import get_profile, measure_latency, predict_latency
from tcompile.fidelity import output_cosine, token_mask_of
from tcompile.lowering import get_backend
from tcompile.optimized import OptimizedModel, input_specs
from tcompile.pass_manager import Instrument, PassManager, graph_flops, tokens_per_layer
from tcompile.planner import Planner
from tcompile.program import Program
from tcompile.progress import Stages
from tcompile.registry import as_specs, format_pipeline
from tcompile.report import Report
from tcompile.report.blocks import block_table
from tcompile.report.op_profile import profile_ops

log = logging.getLogger(__name__)


def _batches(calibration: Any, example_inputs: Any) -> list[tuple[tuple, dict]]:
    if calibration is None:
        return [normalize_inputs(example_inputs)]
    single = isinstance(calibration, (torch.Tensor, dict)) or (
        isinstance(calibration, tuple) and bool(calibration) and isinstance(calibration[0], torch.Tensor))
    if single:  # one batch given directly rather than a list of batches
        return [normalize_inputs(calibration)]
    return [normalize_inputs(b) for b in calibration]


def _check_calibration(baseline: Any, batches: list[tuple[tuple, dict]]) -> None:
    """Each calibration batch must run through the captured model: a wrong shape or key fails
    here, naming the batch, not deep inside the planner."""
    expected = input_specs(baseline.example_args, baseline.example_kwargs)
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            try:
                baseline.gm(*args, **kwargs)
            except Exception as exc:  # any failure of the user's batch is a bad calibration set
                raise ValueError(f"calibration batch {i} does not fit the model's inputs {expected}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; pass "
                                 "batches shaped like the example inputs") from exc


def fidelity_on(reference: Callable[..., Any], candidate: Callable[..., Any],
                batches: Iterable[tuple[tuple, dict]]) -> float:
    """Mean output cosine over calibration batches (padding positions excluded)."""
    scores = []
    with torch.no_grad():
        for args, kwargs in batches:
            scores.append(output_cosine(reference(*args, **kwargs), candidate(*args, **kwargs),
                                        token_mask=token_mask_of(kwargs)))
    return float(sum(scores) / len(scores))


def optimize(model: torch.nn.Module, budget: Any = None, example_inputs: Any = None, calibration: Any = None,
             target: Any = "cpu", backend: str = "eager", passes: Any = None, *, verify: bool = True,
             measure: bool = True, repeats: int = 5, time_limit: float = 600.0, name: str | None = None,
             instruments: list[Instrument] | None = None, progress: bool = False, new_tokens: int = 32
             ) -> OptimizedModel:
    """Optimize ``model`` for ``budget`` on ``target`` and lower it to ``backend``.

    ``passes=None`` lets the planner choose, a list (or pipeline text) forces the pipeline and
    ``[]`` runs the captured model with no rewrite. The user's model is never modified.
    ``time_limit`` bounds the planner (seconds). Causal LMs: ``calibration`` is a list of token
    id tensors; a latency budget is the time to generate ``new_tokens`` after each of them
    (see :mod:`tcompile.runtime.lm_planner`).
    """
    from tcompile.runtime.lm_capture import is_causal_lm
    if isinstance(model, torch.nn.Module) and is_causal_lm(model):
        from tcompile.runtime.lm_optimize import optimize_lm
        return optimize_lm(model, budget=budget, passes=passes, backend=backend, calibration=calibration, name=name,
                           target=target, time_limit=time_limit, new_tokens=new_tokens)
    backend_impl = get_backend(backend)            # fail fast: before any capture work
    budget_obj = Budget.parse(budget)
    specs = as_specs(passes)
    _refuse_lm_only_passes(model, specs)
    if budget_obj is not None and budget_obj.kv_cache is not None:
        raise BudgetError(f"budget kv_cache={budget_obj.kv_cache} applies to causal LMs, and "
                          f"{type(model).__name__} has no KV cache; use flops=, latency= or memory= for encoders")
    profile = get_profile(target)
    if isinstance(calibration, (list, tuple)) and len(calibration) == 0:
        raise ValueError("calibration is empty; pass at least one batch of inputs, or None for the example inputs")
    if example_inputs is None and calibration is not None:
        example_inputs = _batches(calibration, None)[0]
        example_inputs = example_inputs[1] or example_inputs[0]
    stages = Stages(progress, ["capture", "plan", "rewrite", "lower", "measure"])
    with stages.stage("capture"):
        baseline = capture(model, example_inputs, name=name)
        if specs != []:
            require_attention(baseline)
    batches = _batches(calibration, (baseline.example_args, baseline.example_kwargs)
                       if baseline.example_args else baseline.example_kwargs)
    _check_calibration(baseline, batches)
    notes: list[str] = []
    with stages.stage("plan"):
        specs, budget_obj, candidates = _plan(specs, budget_obj, baseline, profile, batches, repeats, time_limit,
                                              notes)
    with stages.stage("rewrite"):
        program, records = PassManager(verify=verify, instruments=list(instruments or []),
                                       target=str(target)).run(baseline, specs)
    pipeline = format_pipeline(specs)
    capability = backend_impl.capability(program.gm)
    if capability.unsupported:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot take {', '.join(capability.unsupported)} (no translation for these "
            f"custom ops; pipeline {format_pipeline(specs)!r}); use backend='inductor', 'aot' or 'eager', which "
            "run them, or drop the pass that inserts them")
    with stages.stage("lower"):
        workdir = Path(tempfile.mkdtemp(prefix="tcompile-"))  # engine files live as long as the runner
        runner = backend_impl.lower(program.gm, program.example_args, program.example_kwargs, workdir)
        weakref.finalize(runner, shutil.rmtree, workdir, True)
    report = _report(baseline, program, records, pipeline, budget_obj, target, backend, profile, notes, candidates)
    report.lowering = capability.to_dict()
    with stages.stage("measure"):
        if measure:
            _measure(report, baseline, program, runner, batches, repeats, profile)
    stages.close()
    _attach_output_mode(report, records)
    return OptimizedModel(runner, report, backend=backend, pipeline=pipeline,
                          budget=budget_obj.to_dict() if budget_obj else None,
                          inputs=input_specs(program.example_args, program.example_kwargs),
                          model_name=baseline.model_name, device=_device_type(program, backend))


def _device_type(program: Program, backend: str) -> str:
    """The device the engine runs on: CUDA for TensorRT, else that of the example inputs."""
    if backend == "tensorrt":
        return "cuda"
    tensors = [t for t in list(program.example_args) + list(program.example_kwargs.values()) if isinstance(t, torch.Tensor)]
    return tensors[0].device.type if tensors else "cpu"


def _refuse_lm_only_passes(model: Any, specs: list | None) -> None:
    """A KV-cache pass forced on a model that is not a causal LM is a user error, not a skip."""
    from tcompile.passes.kv_eviction import is_kv_pass
    wrong = [s.name for s in specs or [] if is_kv_pass(s.name)]
    if wrong:
        raise PassOptionError(f"{', '.join(wrong)} evict KV-cache entries of causal LMs, but {type(model).__name__} "
                              "is not a causal LM (no generate(), or an encoder); use token_merging or "
                              "token_pruning for encoders")


def _plan(specs: list | None, budget_obj: Budget | None, baseline: Program, profile: Any, batches: list,
          repeats: int, time_limit: float, notes: list[str]) -> tuple[list, Budget | None, list]:
    """The forced pipeline, or the planner's choice for the budget (a default budget when none)."""
    candidates: list = []
    if specs is None:
        if budget_obj is None or not budget_obj.cost_fields:
            budget_obj = Budget(flops=0.75, quality=budget_obj.quality if budget_obj else None)
            notes.append("no cost budget given: planned for flops=0.75 (the default)")
        unsupported = [k for k in budget_obj.cost_fields if k in ("memory", "kv_cache")]
        if unsupported:
            notes.append(f"budget fields {unsupported} do not apply to encoders and were ignored")
        planner = Planner(baseline, budget_obj, profile,
                          fidelity_fn=lambda p: fidelity_on(baseline.gm, p.gm, batches),
                          latency_fn=lambda p: _latency_ratio(baseline, p, batches[0], repeats),
                          time_limit=time_limit)
        result = planner.plan()
        specs, candidates = result.specs, result.candidates
        notes += result.notes
    return specs, budget_obj, candidates


def _median_seconds(fn: Callable[..., Any], batch: tuple[tuple, dict], repeats: int) -> float:
    args, kwargs = batch
    return measure_latency(lambda: fn(*args, **kwargs), repeats=repeats)["median"]


def _batch_size(batch: tuple[tuple, dict]) -> int | None:
    args, kwargs = batch
    return next((int(t.shape[0]) for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)


def _latency_ratio(baseline: Program, program: Program, batch: tuple[tuple, dict], repeats: int) -> float:
    return _median_seconds(program.gm, batch, repeats) / _median_seconds(baseline.gm, batch, repeats)


def _report(baseline: Program, program: Program, records: list, pipeline: str, budget: Budget | None,
            target: Any, backend: str, profile: Any, notes: list[str], candidates: list) -> Report:
    return Report(
        model=baseline.model_name, pipeline=pipeline, target=str(getattr(target, "name", target)), backend=backend,
        budget=budget.to_dict() if budget else None, passes=records,
        tokens_per_layer={"baseline": tokens_per_layer(baseline), "optimized": tokens_per_layer(program)},
        flops={"baseline": graph_flops(baseline), "optimized": graph_flops(program)},
        latency={"predicted": {"baseline": predict_latency(baseline.gm, profile),
                               "optimized": predict_latency(program.gm, profile)}},
        candidates=candidates, device=profile.to_dict() if hasattr(profile, "to_dict") else {},
        versions=versions(), notes=list(notes))


def _measure(report: Report, baseline: Program, program: Program, runner: Any, batches: list, repeats: int,
             profile: Any) -> None:
    """Measured latency, fidelity, the op table and predicted vs measured time per block."""
    report.latency["measured"] = {"baseline": _median_seconds(baseline.gm, batches[0], repeats),
                                  "optimized": _median_seconds(runner, batches[0], repeats),
                                  "repeats": repeats, "batch": _batch_size(batches[0])}
    report.fidelity = {"metric": "cosine", "value": fidelity_on(baseline.gm, runner, batches),
                       "n": sum(_batch_size(b) or 0 for b in batches)}
    args, kwargs = batches[0]
    report.op_profile = profile_ops(lambda: runner(*args, **kwargs))
    report.latency["parts"] = block_table(program.gm, args, kwargs, profile)


def _attach_output_mode(report: Report, records: list) -> None:
    modes = [r.stats.get("output_mode") for r in records if r.status == "applied" and r.stats.get("output_mode")]
    descriptions = {"unmerge": "unmerge: per-token outputs restored to the original positions "
                               "(each original token copies its merged group)",
                    "merged": "merged: per-token outputs hold the reduced tokens (fewer than the input)",
                    "none": "no per-token outputs: the head reads the protected CLS token"}
    if modes:
        report.output_mode = descriptions.get(modes[-1], modes[-1])
