"""Causal-LM artifacts: the rewritten prefill and decode programs (and the speculative pass's
verify program), the KV policy, the report.

Both programs go into one PT2 archive (``torch.export.pt2_archive``), which stores the weights
they share once. The decode program is the functional one (its cache scatters return new
tensors); loading makes the in-place copy the runtime steps, as ``runtime_for`` does. The KV
policy and a model-free drafter (prompt_lookup, token_recycling) are rebuilt from the pipeline
text, so an artifact carries no pickled Python objects. Token Recycling's adjacency matrix is
learned again from the first requests (it starts empty, as after ``reset``); a drafter that is a
model (draft_model, layer_skip) is not exported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tcompile.errors import ArtifactError, CaptureError
from tcompile.passes.kv_eviction import is_kv_pass, make_policy
from tcompile.registry import parse_pipeline
from tcompile.runtime.generate import LMRuntime
from tcompile.runtime.lm_capture import LMSpec, decode_dynamic_shapes, inplace_cache_writes, prefill_dynamic_shapes

PROGRAMS_FILE = "lm_programs.pt2"
SPEC_FILE = "lm.json"
KIND = "causal_lm"


def _reexport(gm: torch.nn.Module, args: tuple, shapes: Any, stage: str) -> Any:
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # export raises many types; say which stage failed
        raise CaptureError(f"could not export the rewritten {stage} step for the artifact: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def save_lm(runtime: LMRuntime, prefill_args: tuple, decode_args: tuple, pipeline: str, directory: Path,
            verify_args: tuple | None = None) -> list[str]:
    """Write the programs and ``lm.json`` into ``directory``; returns the file names.
    ``verify_args``: the verify step's example inputs, for a speculative runtime."""
    from torch.export.pt2_archive._package import package_pt2

    from tcompile.runtime.verify import verify_dynamic_shapes
    n_kv = 2 * runtime.spec.num_layers
    programs = {"prefill": _reexport(runtime.prefill_graph, prefill_args, prefill_dynamic_shapes(), "prefill"),
                "decode": _reexport(runtime.decode_graph, decode_args, decode_dynamic_shapes(n_kv), "decode")}
    if runtime.prompt_filter is not None:
        programs["filter"] = _reexport(runtime.prompt_filter.fn, prefill_args, prefill_dynamic_shapes(), "filter")
    verify = getattr(runtime, "verify_graph", None)
    if verify is not None:
        drafter = runtime.speculative_options.drafter
        if drafter not in ("prompt_lookup", "token_recycling"):
            raise ArtifactError(f"the speculative pass drafts with drafter={drafter!r}, a model that artifacts do not "
                                "hold; export a plan with a model-free drafter (prompt_lookup, token_recycling), or "
                                "keep this OptimizedLM in the process")
        if verify_args is None:
            raise ArtifactError("exporting a speculative runtime needs the verify step's example inputs")
        programs["verify"] = _reexport(verify, verify_args, verify_dynamic_shapes(n_kv), "verify")
    package_pt2(str(directory / PROGRAMS_FILE), exported_programs=programs)
    spec = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
            for k, v in runtime.spec.__dict__.items()}
    (directory / SPEC_FILE).write_text(json.dumps({"spec": spec, "pipeline": pipeline}, indent=2) + "\n")
    return [PROGRAMS_FILE, SPEC_FILE]


def load_lm_runtime(directory: Path) -> tuple[LMRuntime, str]:
    """The runtime (and pipeline text) of an artifact written by :func:`save_lm`."""
    from torch.export.pt2_archive._package import load_pt2

    from tcompile.runtime.lm_optimize import prompt_filter
    try:
        meta = json.loads((directory / SPEC_FILE).read_text())
        fields = dict(meta["spec"])
        fields["dtype"] = getattr(torch, fields["dtype"])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        spec = LMSpec(**fields)
        pipeline = meta["pipeline"]
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{directory / SPEC_FILE} is missing or malformed ({type(exc).__name__}: {exc}); "
                            "re-export the artifact") from exc
    contents = load_pt2(str(directory / PROGRAMS_FILE))
    programs = contents.exported_programs
    specs = parse_pipeline(pipeline)
    prune = [s for s in specs if s.name == "prompt_pruning"]
    spec_dec = [s for s in specs if s.name == "speculative"]
    if not {"prefill", "decode"} <= set(programs) or ("filter" in programs) != bool(prune) or \
            ("verify" in programs) != bool(spec_dec):
        raise ArtifactError(f"{directory / PROGRAMS_FILE} holds programs {sorted(programs)}, which do not match "
                            f"the pipeline {pipeline!r}; re-export the artifact")
    kv = [s for s in specs if is_kv_pass(s.name)]
    policy = make_policy(kv[0].name, kv[0].options) if kv else None
    decode = programs["decode"].module()
    gem = prompt_filter(programs["filter"].module(), prune) if prune else None
    if spec_dec:
        from tcompile.runtime.speculative_build import build_speculative
        runtime = build_speculative(spec, programs["verify"].module(), spec_dec[0].options, None,
                                    prefill=programs["prefill"].module(), decode=inplace_cache_writes(decode),
                                    policy=policy, decode_graph=decode, prompt_filter=gem)
    else:
        runtime = LMRuntime(programs["prefill"].module(), inplace_cache_writes(decode), spec, policy,
                            decode_graph=decode, prompt_filter=gem)
    return runtime, pipeline
