"""Backend ``inductor``: ``torch.compile`` (TorchInductor) of the rewritten graph.

The rewritten GraphModule is re-exported with a dynamic batch (the same program the ``eager``
artifact stores) and that program's module is compiled. Compiling the re-exported module, not
the live GraphModule, means a freshly lowered model and a loaded artifact run the very same
graph. tcompile's custom ops (``tcompile::tome_match``, the sparse-attention ops) are
``torch.library`` ops: Inductor keeps them as opaque calls (Triton kernels on CUDA) and fuses the
aten ops around them.

Saving writes the exported program (``torch.export.save``) and the compile options; loading
re-compiles. That is not slow the second time: Inductor's on-disk FX-graph and kernel caches
(``TORCHINDUCTOR_CACHE_DIR``, by default under ``/tmp``) turn a repeat compile of the same graph
into a cache hit of a few seconds. For deployment without any compile step, use ``aot``.

Inference settings. tcompile's programs are inference-only, so the program is compiled with
Inductor's *freezing*: parameters become constants, constant-folded, and on CPU the GEMM weights
are pre-packed. Freezing must be set in ``torch._inductor.config`` while the compile runs:
``torch.compile(options={"freezing": True})`` is silently ignored (torch 2.13; checked by the
generated code, which still passed the weights as inputs). On a CPU the batch is compiled
symbolic (``dynamic=True``): with a symbolic batch Inductor packs fp32 linear weights for oneDNN
(``mkldnn._linear_pointwise``), with a static one for MKL's packed SGEMM, which is no faster than
the unpacked GEMM eager calls; GELUs are kept out of oneDNN's GEMM epilogue, which is slower
than a separate pass here (:mod:`tcompile.lowering.inductor_passes`). On the 2-core AVX2 build
machine a lone ViT-B/16 linear ran at 120-132 GFLOP/s through oneDNN against 68-111 through
ATen's GEMM (one-off /tmp scripts); ViT-B/16 with ``token_merging{r=16}`` at batch 8 went from
1.03-1.08x eager to 1.21x and 1.16x in two runs of bench/lowering_speed.py and 1.00x in a later
one-off check (eager's own time drifts by more than that; bench/RESULTS.md §8).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tcompile.artifact import atomic_write_text
from tcompile.errors import ArtifactError, CaptureError
from tcompile.inputs import batch_inputs, call_names
from tcompile.lowering.inductor_passes import GeluOutsideGemm

logger = logging.getLogger(__name__)

PROGRAM_FILE = "program.pt2"
OPTIONS_FILE = "inductor.json"
DEFAULT_OPTIONS: dict[str, Any] = {}


def _on_cpu(program: Any) -> bool:
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)


def export_dynamic_batch(module: torch.nn.Module, args: tuple, kwargs: dict, what: str) -> Any:
    """``torch.export`` of ``module`` with the shared symbolic batch (see :mod:`tcompile.inputs`)."""
    arg_names, kwarg_names = call_names(module, tuple(args), dict(kwargs or {}))
    kwargs = {n: kwargs[n] for n in kwarg_names}
    args, kwargs, shapes, _ = batch_inputs(arg_names, tuple(args), kwargs, True)
    try:
        with torch.no_grad():
            return torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # export raises many unrelated types; say which backend needed it
        raise CaptureError(f"could not re-export the rewritten graph for the {what} backend: "
                           f"{type(exc).__name__}: {exc}") from exc


class InferenceCompiled:
    """``torch.compile(fn)`` run under ``no_grad`` with tcompile's inference settings (freezing,
    and on a CPU the GELU pass) held in ``torch._inductor.config``: compiles happen inside calls
    (the first, and any recompile), so the settings must be in force there, not at wrap time."""

    def __init__(self, fn: Any, config: dict[str, Any], **compile_kwargs: Any) -> None:
        self.config = config
        self.compiled = torch.compile(fn, backend="inductor", **compile_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), torch._inductor.config.patch(self.config):
            return self.compiled(*args, **kwargs)


# Inductor settings for an LM decode or verify step on a CPU: a call scores a few tokens, so its
# time goes to the weights' memory traffic and to per-call and per-kernel overheads, not FLOPs.
# Measured on SmolLM2 (2-core EPYC, ``OMP_WAIT_POLICY=PASSIVE``,
# ``bench/verify_cost.py --backend inductor --settings-ab``; bench/RESULTS.md §9): all three took a
# decode step from 68.2 to 54.2 ms and a 9-token verify step from 86.4 to 57.6 ms (1.27 → 1.06× decode).
STEP_SETTINGS: dict[str, dict[str, Any]] = {
    # Inductor's own C++ kernels on one thread: with a symbolic token count it opens an OpenMP region
    # for each of ~450 kernels of a few thousand elements, and the hand-off costs more than the work.
    "serial_kernels": {"cpp.threads": 1},
    # The per-call wrapper (buffer allocation, size arithmetic, ~450 kernel launches) in C++, not Python.
    "cpp_wrapper": {"cpp_wrapper": True},
    # q/k/v, and gate/up, which read the same input, as one GEMM each (frozen weights concatenated).
    "concat_linear": {"cpp.enable_concat_linear": True},
}


def compile_for_inference(fn: Any, *, on_cpu: bool, freezing: bool = True, step_settings: tuple[str, ...] = (),
                          **compile_kwargs: Any) -> InferenceCompiled:
    """The one way tcompile compiles a graph with Inductor (the ``inductor`` backend and the LM
    runtime's decode/verify steps): see the module docstring for why freezing and the pass.

    ``step_settings`` (CPU only; names from :data:`STEP_SETTINGS`): the settings for a step over a
    few tokens, which the LM runtime asks for all of; encoders, whose kernels are large, keep
    Inductor's defaults."""
    unknown = set(step_settings) - set(STEP_SETTINGS)
    if unknown:
        raise ValueError(f"unknown Inductor step settings {sorted(unknown)}; known: {sorted(STEP_SETTINGS)}")
    config: dict[str, Any] = {"freezing": freezing}
    if freezing and on_cpu:
        config["post_grad_custom_pre_pass"] = GeluOutsideGemm()
    if on_cpu:
        for name in step_settings:
            config.update(STEP_SETTINGS[name])
    return InferenceCompiled(fn, config, **compile_kwargs)


class InductorModule:
    """A ``torch.compile``-d rewritten program with the original model's calling convention.

    ``dynamic=None`` (the default) means symbolic shapes on a CPU (oneDNN-packed GEMMs, see the
    module docstring; one compile serves every batch) and, elsewhere, the shapes of the first
    call (static sizes for Triton to specialise on; another batch recompiles once, symbolic).
    ``freezing`` (default on) folds the weights into the compiled code as constants: a frozen
    module does not see later changes to the program's parameters, and holds its packed copies.
    """

    backend = "inductor"

    def __init__(self, program: Any, *, mode: str | None = None, dynamic: bool | None = None,
                 options: dict[str, Any] | None = None, freezing: bool = True) -> None:
        self.program, self.mode, self.dynamic, self.freezing = program, mode, dynamic, freezing
        self.options = dict(DEFAULT_OPTIONS if options is None else options)
        on_cpu = _on_cpu(program)
        self.compiled = compile_for_inference(program.module(), on_cpu=on_cpu, freezing=freezing, mode=mode,
                                              dynamic=True if dynamic is None and on_cpu else dynamic,
                                              options=self.options or None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    def save(self, directory: Path) -> list[str]:
        """Write ``program.pt2`` and ``inductor.json`` (the compile options) into ``directory``."""
        directory = Path(directory)
        torch.export.save(self.program, str(directory / PROGRAM_FILE))
        atomic_write_text(directory / OPTIONS_FILE, json.dumps({"mode": self.mode, "dynamic": self.dynamic,
                                                                 "freezing": self.freezing,
                                                                 "options": self.options}) + "\n")
        return [PROGRAM_FILE, OPTIONS_FILE]

    @classmethod
    def load(cls, directory: Path) -> "InductorModule":
        """Re-compile the saved program (fast when Inductor's cache holds it)."""
        directory = Path(directory)
        try:
            options = json.loads((directory / OPTIONS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{directory / OPTIONS_FILE} is missing or unreadable ({exc}); re-export") from exc
        program = torch.export.load(str(directory / PROGRAM_FILE))
        return cls(program, mode=options.get("mode"), dynamic=options.get("dynamic"), options=options.get("options"),
                   freezing=options.get("freezing", True))


def lower_inductor(module: torch.nn.Module, args: tuple, kwargs: dict, workdir: Path | None = None, *,
                   mode: str | None = None, dynamic: bool | None = None,
                   options: dict[str, Any] | None = None) -> InductorModule:
    """Re-export ``module`` with a dynamic batch and ``torch.compile`` it (compiled lazily, on the first call)."""
    program = export_dynamic_batch(module, args, kwargs, "inductor")
    logger.info("inductor: compiling the rewritten program (mode=%s, dynamic=%s, options=%s)", mode, dynamic, options)
    return InductorModule(program, mode=mode, dynamic=dynamic, options=options)
