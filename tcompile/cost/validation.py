"""Is the cost model right? Predict and measure a set of configurations, report rank and error.

The planner prunes candidates by predicted latency, so what matters most is that the model
*ranks* configurations as the clock does (Spearman's rho) and, for budgets stated as ratios, that
its absolute figures are near (median relative error). ``validate`` runs both sides the same
way: the rewritten graph of each configuration is priced by :func:`predict_latency` at the
measured shapes, and timed in interleaved rounds (one call of each configuration per round;
each configuration's median ratio to the first within a round: :func:`paired_median`), so a
machine that slows down mid-run slows every configuration alike (the rewritten
graphs share the model's weights: ten SmolLM2 configurations with their 2k caches fit in a few GB).
A decode step is priced with its cache bookkeeping (the policy's ranking: ``book_cost``).

Phases: an encoder's forward on its example inputs; a causal LM's ``prefill`` of a ``tokens``-long
prompt (GemFilter's filter graph included where the pipeline prunes the prompt) or one ``decode``
step after a ``context``-token prompt, with the cache the pipeline's KV policy keeps.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tcompile.cost.lm import book_cost, priced_at
from tcompile.cost.model import predict_latency
from tcompile.registry import PassSpec, format_pipeline, parse_pipeline

PHASES = ("forward", "prefill", "decode")


@dataclass
class ConfigResult:
    pipeline: str
    predicted_s: float
    measured_s: float
    times_s: list[float] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative error of the prediction: predicted / measured - 1."""
        return self.predicted_s / self.measured_s - 1.0


@dataclass
class Validation:
    """Per-configuration predictions and measurements, with the summary the planner relies on."""

    phase: str
    profile: str
    rows: list[ConfigResult]

    @property
    def spearman(self) -> float:
        return spearman([r.predicted_s for r in self.rows], [r.measured_s for r in self.rows])

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(r.error) for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "profile": self.profile, "spearman": self.spearman,
                "median_abs_error": self.median_abs_error,
                "rows": [{**asdict(r), "error": r.error} for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'pipeline':60s} {'predicted':>10s} {'measured':>10s} {'error':>7s}"]
        lines += [f"{r.pipeline or '(none)':60.60s} {r.predicted_s * 1e3:8.1f}ms {r.measured_s * 1e3:8.1f}ms "
                  f"{r.error:+7.1%}" for r in self.rows]
        lines.append(f"Spearman {self.spearman:.3f}, median |error| {self.median_abs_error:.1%} "
                     f"({len(self.rows)} configurations, {self.phase}, profile {self.profile})")
        return "\n".join(lines)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):          # ties share their mean rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks, ties averaged)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two equally long series of at least 2 values, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def _specs(config: str | Sequence[PassSpec]) -> list[PassSpec]:
    return parse_pipeline(config) if isinstance(config, str) else list(config)


def _forward_case(program: Any, specs: list[PassSpec], profile: Any) -> tuple[float, Callable[[], Any]]:
    from tcompile.pass_manager import PassManager
    rewritten, _ = PassManager(verify=False).run(program, specs)
    args, kwargs = program.example_args, program.example_kwargs
    return predict_latency(rewritten.gm, profile), lambda: rewritten.gm(*args, **kwargs)


def _lm_case(program: Any, specs: list[PassSpec], phase: str, tokens: int, profile: Any
             ) -> tuple[float, Callable[[], Any]]:
    from tcompile.runtime.lm_optimize import runtime_for
    runtime, _ = runtime_for(program, specs)
    ids = torch.randint(0, program.spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    filt = runtime.prompt_filter
    if phase == "prefill":
        predicted, kept = 0.0, (ids, mask)
        if filt is not None:
            kept = filt(ids, mask)[:2]
            if kept[0].shape[1] < tokens:          # the filter ran: its graph is part of the prefill
                predicted += priced_at(filt.fn, (ids, mask), profile)

        def run() -> Any:
            return runtime.prefill_fn(*(filt(ids, mask)[:2] if filt is not None else (ids, mask)))
        return predicted + priced_at(runtime.prefill_fn, kept, profile), run
    if filt is not None:
        ids, mask = filt(ids, mask)[:2]
    capacity = runtime.capacity(int(ids.shape[1]))
    _, cache = runtime._prefill(ids, mask, capacity)
    token, recorded, decode = ids[:, -1], [], runtime.decode_fn

    def recording(*args: Any) -> Any:                   # the step's real inputs and outputs
        recorded.append((args, decode(*args)))
        return recorded[-1][1]
    runtime.decode_fn = recording
    try:
        runtime._decode(token, cache, capacity)
    finally:
        runtime.decode_fn = decode
    (step_args, step_out), = recorded
    _, seen, valid, slot, _ = step_args
    book_args = (runtime._split(step_out)[2], cache.pos, cache.state, valid, seen[:, 0], slot)
    policy = runtime.policy if runtime.evicts else None
    predicted = priced_at(runtime.decode_graph, step_args, profile) + book_cost(policy, capacity, book_args, profile)
    return predicted, lambda: runtime._decode(token, cache, capacity)


def validate(model: Any, configs: Sequence[str | Sequence[PassSpec]], example_inputs: Any = None, *,
             phase: str = "forward", tokens: int = 1024, profile: Any = "cpu", rounds: int = 5,
             warmup: int = 1) -> Validation:
    """Predict and measure each configuration (a pipeline text or list of PassSpecs; ``""`` is
    the unoptimized model) of ``model``; see the module docstring for ``phase``/``tokens``
    (prompt length for prefill, context before the decode step). A causal LM may be given as its
    ``capture_lm`` program to share one capture between calls."""
    from tcompile.cost.profile import get_profile
    from tcompile.runtime.lm_capture import LMProgram, capture_lm, is_causal_lm
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is unknown; choose one of {PHASES}")
    if len(configs) < 2:
        raise ValueError(f"validate needs at least two configurations to rank, got {len(configs)} (pipeline texts, "
                         "'' for the unoptimized model)")
    if rounds < 1 or tokens < 1:
        raise ValueError(f"rounds={rounds} and tokens={tokens} must be positive")
    prof = get_profile(profile)
    is_lm = isinstance(model, LMProgram) or (isinstance(model, torch.nn.Module) and is_causal_lm(model))
    if is_lm != (phase != "forward"):
        raise ValueError(f"phase={phase!r} does not fit this model: causal LMs take 'prefill' or 'decode', "
                         "encoders 'forward'")
    if is_lm:
        program = model if isinstance(model, LMProgram) else capture_lm(model)
    else:
        from tcompile.capture import capture
        from tcompile.program import Program
        program = model if isinstance(model, Program) else capture(model, example_inputs)
    def build(config: str | Sequence[PassSpec]) -> tuple[str, float, Callable[[], Any]]:
        specs = _specs(config)
        pred, fn = _lm_case(program, specs, phase, tokens, prof) if is_lm else _forward_case(program, specs, prof)
        return format_pipeline(specs), pred, fn

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with torch.no_grad():   # interleaved rounds: a machine that slows down mid-run slows every configuration alike
        cases = [build(config) for config in configs]
        for _, _, fn in cases:
            for _ in range(warmup):
                fn()
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(rounds):
            for i, (_, _, fn) in enumerate(cases):
                times[i].append(timed(fn))
        results = [(name, pred, t) for (name, pred, _), t in zip(cases, times)]
    rows = [ConfigResult(name, pred, paired_median(t, times[0]), t) for name, pred, t in results]
    return Validation(phase, prof.name, rows)


def paired_median(times: Sequence[float], reference: Sequence[float]) -> float:
    """A configuration's seconds from interleaved rounds: its median ratio to the reference
    configuration (the first) of the same round, times the reference's median. Why paired: on a
    shared machine a slow spell spans rounds (a SmolLM2 decode step measured 85-100 ms for four
    rounds, then 130-160 ms), and a per-configuration median then ranks by which rounds landed in
    the spell; a ratio taken within one round cancels it."""
    return statistics.median(t / r for t, r in zip(times, reference)) * statistics.median(reference)
