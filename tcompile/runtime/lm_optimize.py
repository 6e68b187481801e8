"""``optimize`` for causal LMs: capture prefill/decode (and verify), apply the pipeline, plan a budget.

``tcompile.optimize`` routes here when the model generates text. A pipeline holds at most one
pass of each LM family (KV eviction, prompt pruning, sparse attention, speculative decoding);
with a ``latency`` or ``kv_cache`` budget and no pipeline, :mod:`tcompile.runtime.lm_planner`
chooses one on the calibration texts.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from tcompile.artifact import compatibility, staged_directory, versions, write_manifest
from tcompile.budget import Budget
from tcompile.errors import (ArtifactError, BackendUnavailableError, BudgetError, BudgetUnreachableError,
                             PassOptionError, TCompileError)
from tcompile.lowering import get_backend
from tcompile.pass_manager import PassManager
from tcompile.passes.kv_eviction import POLICIES, is_kv_pass, make_policy
from tcompile.registry import PassSpec, as_specs, format_pipeline
from tcompile.report import Report
from tcompile.report.op_profile import profile_ops
from tcompile.report.report import CandidateRecord
from tcompile.runtime.generate import LMRuntime, PromptFilter
from tcompile.runtime.lm_capture import LMProgram, capture_lm, inplace_cache_writes
from tcompile.runtime.lm_lowering import ENGINE_FILES, attach_engines, build_engines, engine_files

log = logging.getLogger(__name__)

class OptimizedLM:
    """A causal LM captured as prefill/decode graphs with its KV policy: ``generate``, a report, export."""

    def __init__(self, runtime: LMRuntime, report: Report, pipeline: str, budget: dict | None, model_name: str,
                 example_args: tuple[tuple, tuple] | None = None, backend: str = "eager",
                 engines: tuple[Path, list[str]] | None = None) -> None:
        """``example_args``: (prefill args, decode args[, verify args]) to re-export the graphs; None for a
        loaded artifact.
        ``engines``: (directory, file names) of the backend's step engines, copied into exports."""
        self.runtime, self.report, self.engines = runtime, report, engines
        self.pipeline, self.budget, self.backend = pipeline, budget, backend
        self.model_name, self._example_args = model_name, example_args

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """As transformers' ``generate``: prompt ids (left padded) → prompt + new ids. With the
        speculative pass, the last call's acceptance figures also land in ``report.latency``."""
        out = self.runtime.generate(input_ids, attention_mask, **kwargs)
        summary = getattr(self.runtime.last_stats, "summary", None)
        if summary is not None:
            self.report.latency["speculative"] = summary()
        return out

    @property
    def last_stats(self) -> Any:
        """Cache sizes and timings of the last ``generate`` call."""
        return self.runtime.last_stats

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, V] for a (left-padded) prompt: the prefill step."""
        ids, mask = self.runtime._check(input_ids, attention_mask, 1)
        with torch.no_grad():
            return self.runtime.prefill_fn(ids, mask)[0]

    def export(self, path: str | Path, layout: str = "artifact") -> Path:
        """Write an artifact that ``tcompile.load`` turns back into an OptimizedLM (no model needed)."""
        from tcompile.runtime.lm_artifact import KIND, save_lm
        if layout != "artifact":
            raise ArtifactError(f"layout {layout!r} is not available for causal LMs: generation is a loop of prefill "
                                "and decode steps driven by tcompile's runtime, not one engine a server can batch; "
                                "export with layout='artifact' and serve it with tcompile.load")
        if self._example_args is None:
            raise TCompileError(f"{self.model_name} was loaded from an artifact; copy that directory instead "
                                "of exporting it again")
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not (path / "manifest.json").exists():
            raise ArtifactError(f"{path} exists and is not a tcompile artifact; refusing to overwrite it. "
                                "Choose an empty or new directory")
        with staged_directory(path) as staging:
            prefill_args, decode_args, *verify_args = self._example_args
            files = save_lm(self.runtime, prefill_args, decode_args, self.pipeline, staging,
                            verify_args[0] if verify_args else None)
            if self.engines is not None:
                directory, names = self.engines
                for name in names:
                    shutil.copy2(Path(directory) / name, staging / name)
                files += names
            for suffix in ("json", "md", "html"):
                self.report.save(staging / f"report.{suffix}")
                files.append(f"report.{suffix}")
            write_manifest(staging, files, {"kind": KIND, "model": self.model_name, "backend": self.backend,
                                            "pipeline": self.pipeline, "budget": self.budget,
                                            "target": self.report.target, "requires_torch_match": True,
                                            **compatibility(self.backend)})
        return path

    def __repr__(self) -> str:
        return f"OptimizedLM({self.model_name}, pipeline={self.pipeline!r})"


def load_lm(path: Path, manifest: dict) -> OptimizedLM:
    """The OptimizedLM of an artifact directory whose manifest says kind=causal_lm (checked already)."""
    from tcompile.runtime.lm_artifact import load_lm_runtime
    try:
        runtime, pipeline = load_lm_runtime(path)
    except TCompileError:
        raise
    except Exception as exc:
        raise ArtifactError(f"could not load the causal-LM programs in {path}: {type(exc).__name__}: {exc}. "
                            "Re-export the artifact with this version of tcompile") from exc
    report = Report.load(path) if (path / "report.json").exists() else Report(manifest.get("model", "model"), pipeline)
    backend = manifest.get("backend", "eager")
    check_lm_backend(backend)
    lower_lm(runtime, backend, engine_dir=path)
    return OptimizedLM(runtime, report, pipeline, manifest.get("budget"), manifest.get("model", "model"), backend=backend)


LM_BACKENDS = ("eager", "inductor", "aot", "onnxruntime")


def check_lm_backend(backend: str) -> None:
    """Refuse a backend the LM runtime cannot drive, or one whose packages are missing (naming the extra)."""
    if backend not in LM_BACKENDS:
        raise BackendUnavailableError(f"backend {backend!r} is not available for causal LMs; choose one of "
                                      f"{LM_BACKENDS} (the generation runtime drives the prefill/decode graphs)")
    get_backend(backend)


def lower_lm(runtime: LMRuntime, backend: str, example_args: tuple[tuple, tuple] | None = None,
             engine_dir: Path | None = None) -> tuple[Path, list[str]] | None:
    """Lower the runtime's steps to ``backend`` in place; returns (directory, engine files) or None.

    ``inductor`` compiles the (in-place) decode step, and the verify step of a speculative
    runtime, with ``torch.compile(dynamic=True)`` under freezing
    (:func:`tcompile.lowering.inductor.compile_for_inference`): one compilation, on the first
    call, serves every cache size, batch and draft length; the ~2,000 small ops of a step fuse
    into a few kernels and on a CPU the weights are pre-packed for oneDNN, which matters most
    for the small-M GEMMs of a verify step; on a CPU it also takes every setting for a step over a
    few tokens (``STEP_SETTINGS``: serial generated kernels, a C++ wrapper, concatenated q/k/v and
    gate/up GEMMs). The prefill runs once per prompt and stays eager.
    ``aot`` and ``onnxruntime`` run every step as an engine (prefill, decode, and verify for the
    speculative pass; :mod:`tcompile.runtime.lm_lowering`):
    built from ``example_args`` into a fresh folder, or loaded from ``engine_dir`` (an artifact).
    """
    check_lm_backend(backend)
    if backend == "inductor":
        from tcompile.lowering.inductor import STEP_SETTINGS, compile_for_inference
        on_cpu = all(p.device.type == "cpu" for p in runtime.decode_fn.parameters())
        for step in ("decode_fn", "verify_fn") if hasattr(runtime, "verify_fn") else ("decode_fn",):
            setattr(runtime, step, compile_for_inference(getattr(runtime, step), on_cpu=on_cpu, dynamic=True,
                                                         step_settings=tuple(STEP_SETTINGS)))
    if backend not in ENGINE_FILES:
        return None
    if engine_dir is None:
        if example_args is None:
            raise TCompileError(f"backend {backend!r} needs the example step inputs (or an artifact) to build engines")
        engine_dir = Path(tempfile.mkdtemp(prefix="tcompile-lm-"))
        weakref.finalize(runtime, shutil.rmtree, engine_dir, True)   # engine files live as long as the runtime
        names = build_engines(runtime, backend, *example_args, engine_dir)
    else:
        names = list(engine_files(runtime, backend).values())
    attach_engines(runtime, backend, Path(engine_dir))
    return Path(engine_dir), names


def runtime_for(program: LMProgram, specs: list[PassSpec], model: torch.nn.Module | None = None
                ) -> tuple[LMRuntime, list]:
    """Apply ``specs`` to both graphs and build the runtime with the KV policy, prompt filter and
    speculative decoder they name (``model``: the original, for drafters built from it)."""
    kv = [s for s in specs if is_kv_pass(s.name)]
    prune = [s for s in specs if s.name == "prompt_pruning"]
    spec_dec = [s for s in specs if s.name == "speculative"]
    other = [s.name for s in specs
             if not is_kv_pass(s.name) and s.name not in ("prompt_pruning", "sparse_attention", "speculative")]
    if other:
        raise PassOptionError(f"pass(es) {other} do not apply to causal LMs; use a KV-cache pass "
                              f"({', '.join(sorted(POLICIES))}), prompt_pruning, sparse_attention and/or speculative")
    for group, what in ((kv, "KV-cache pass"), (prune, "prompt_pruning pass"), (spec_dec, "speculative pass")):
        if len(group) > 1:
            raise PassOptionError(f"one {what} at a time, got {[format_pipeline([s]) for s in group]}")
    info = {"kv_heads": program.spec.kv_heads}
    program.prefill.info.update(info)
    program.decode.info.update(info)
    manager = PassManager(verify=False)
    prefill, rec_p = manager.run(program.prefill, specs)
    decode, rec_d = manager.run(program.decode, specs)
    policy = make_policy(kv[0].name, kv[0].options) if kv else None
    filt = prompt_filter(prefill.info.get("prompt_filter"), prune)
    if spec_dec:
        from tcompile.runtime.speculative_build import build_speculative
        runtime = build_speculative(program.spec, program.verify.gm if program.verify else None, spec_dec[0].options,
                                    model, prefill=prefill.gm,
                                    decode=inplace_cache_writes(decode.gm), policy=policy, decode_graph=decode.gm,
                                    prompt_filter=filt)
    else:
        runtime = LMRuntime(prefill.gm, inplace_cache_writes(decode.gm), program.spec, policy, decode_graph=decode.gm,
                            prompt_filter=filt)
    return runtime, rec_p + rec_d


def phase_table(runtime: LMRuntime, prompt: torch.Tensor, target: Any, new_tokens: int = 8) -> list[dict[str, Any]]:
    """Predicted vs measured seconds of the prefill and of one decode (or verify) step of
    ``runtime`` on ``prompt``, for the report: one generation of ``new_tokens`` (eager figures
    of the step graphs; a compiled backend's steps are faster than their eager price)."""
    import statistics

    from tcompile.cost.lm import StepPricer
    from tcompile.cost.profile import get_profile
    runtime.generate(prompt[None], max_new_tokens=new_tokens, eos_token_id=[])
    stats = runtime.last_stats
    pricer = StepPricer(runtime.spec, get_profile(target))
    n = int(prompt.numel())
    kept = stats.prompt_tokens_kept or n
    context = (stats.capacity + 1) if runtime.evicts else kept + new_tokens // 2
    step = "verify step" if hasattr(runtime, "verify_fn") else "decode step"
    predicted_step = pricer.decode(runtime.decode_graph, context)
    if hasattr(runtime, "verify_fn") and stats.steps:
        predicted_step += stats.drafted / stats.steps * pricer.matmul_per_token(runtime.decode_graph)
    rows = [{"part": f"prefill ({n} tokens{f', {kept} kept' if kept != n else ''})",
             "predicted_s": pricer.prefill(runtime.prefill_graph, n, runtime.prompt_filter),
             "measured_s": stats.prefill_s}]
    if stats.decode_s:
        rows.append({"part": f"{step} (cache ~{context})", "predicted_s": predicted_step,
                     "measured_s": statistics.median(stats.decode_s)})
    return rows


def prompt_filter(fn: Any, specs: list[PassSpec]) -> PromptFilter | None:
    """The runtime's GemFilter stage from the filter graph and the prompt_pruning options."""
    if fn is None or not specs:
        return None
    o = specs[0].options
    return PromptFilter(fn, o.keep, o.kernel, o.tail)


def _calibration_ids(calibration: Any) -> list[torch.Tensor] | None:
    """Calibration text as a list of 1-D token id tensors, checked: empty sets and non-id tensors
    fail here with the batch named."""
    if calibration is None:
        return None
    items = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    if not items:
        raise ValueError("calibration is empty; pass a list of token id tensors (a few hundred tokens of "
                         "representative text each), or None")
    out = []
    for i, item in enumerate(items):
        ids = item if isinstance(item, torch.Tensor) else torch.as_tensor(item)
        if ids.dtype not in (torch.long, torch.int) or ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise ValueError(f"calibration[{i}] must be the token ids of one text (an integer tensor [tokens] or "
                             f"[1, tokens]), got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() < 64:
            raise ValueError(f"calibration[{i}] has {ids.numel()} tokens; give at least 64 (the last 32 are "
                             "teacher-forced against the full model)")
        out.append(ids.reshape(-1).long())
    return out


def optimize_lm(model: torch.nn.Module, budget: Any = None, passes: Any = None, backend: str = "eager",
                calibration: Any = None, name: str | None = None, target: Any = "cpu", time_limit: float = 300.0,
                new_tokens: int = 32) -> OptimizedLM:
    """``tcompile.optimize`` for causal LMs. With a budget and no pipeline the LM planner
    (:mod:`tcompile.runtime.lm_planner`) chooses across KV eviction, sparse attention, prompt
    pruning and speculative decoding on the calibration texts, generating ``new_tokens`` per
    prompt to measure latency; ``time_limit`` seconds bound capture and planning together."""
    started = time.monotonic()           # time_limit bounds capture and planning together
    check_lm_backend(backend)            # fail before the capture work
    budget_obj = Budget.parse(budget)
    specs = as_specs(passes)
    unsupported = sorted(k for k in (budget_obj.cost_fields if budget_obj else {}) if k not in ("kv_cache", "latency"))
    if unsupported and specs is None:
        raise BudgetError(f"budget field(s) {unsupported} are not planned for causal LMs in this version (the LM "
                          "planner plans latency= and kv_cache=, with quality=); set those or choose the pipeline "
                          "with passes=")
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens!r} must be an integer >= 2 (tokens generated per calibration "
                         "prompt when the planner measures latency)")
    calibration = _calibration_ids(calibration)
    planning = specs is None and budget_obj is not None and budget_obj.cost_fields
    if planning and calibration is None:
        raise TCompileError(f"Budget({budget_obj}) needs calibration text to plan for a causal LM: pass "
                            "calibration=[token ids tensor, ...] (a few hundred tokens of representative text "
                            "each; the last 32 of each are teacher-forced to measure agreement)")
    wants_verify = any(s.name == "speculative" for s in specs or []) or bool(planning and budget_obj.latency)
    program = capture_lm(model, name, verify=wants_verify)
    notes: list[str] = []
    candidates: list[CandidateRecord] = []
    if specs is None:
        if planning:
            from tcompile.cost.profile import get_profile
            from tcompile.runtime.lm_planner import LMPlanner, Workload
            left = time_limit - (time.monotonic() - started)
            if left <= 0:
                raise BudgetUnreachableError(f"capturing {program.model_name} took the whole time_limit={time_limit:g} s; "
                                             "nothing was planned: raise time_limit")
            planner = LMPlanner(program, budget_obj, Workload(calibration, new_tokens=new_tokens),
                                lambda s: runtime_for(program, s, model)[0], get_profile(target), left)
            plan = planner.plan()
            specs, candidates, notes = plan.specs, plan.candidates, plan.notes
        else:
            specs = []
            notes.append("no cost budget (latency= or kv_cache=): the captured model runs unchanged")
    runtime, records = runtime_for(program, specs, model)
    example_args = (program.prefill.example_args, program.decode.example_args)
    engines = lower_lm(runtime, backend, example_args)
    if program.verify is not None:
        example_args += (program.verify.example_args,)
    pipeline = format_pipeline(specs)
    report = Report(program.model_name, pipeline, target=str(target), backend=backend,
                    budget=budget_obj.to_dict() if budget_obj else None, passes=records, candidates=candidates,
                    versions=versions(), notes=notes)
    if calibration:                      # where a short generation of the chosen plan spends its time
        prompt = calibration[0][:-32]
        report.op_profile = profile_ops(lambda: runtime.generate(prompt[None], max_new_tokens=8, eos_token_id=[]))
        report.latency["parts"] = phase_table(runtime, prompt, target)
        summary = getattr(runtime.last_stats, "summary", None)   # speculative: acceptance rate, accepted length
        if summary is not None:
            report.latency["speculative"] = summary()
    return OptimizedLM(runtime, report, pipeline, budget_obj.to_dict() if budget_obj else None, program.model_name,
                       example_args, backend=backend, engines=engines)
