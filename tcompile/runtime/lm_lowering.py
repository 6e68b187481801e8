"""Causal-LM engines: the prefill, decode and verify steps lowered to AOTInductor packages or ONNX Runtime.

The generation runtime (:class:`LMRuntime`) stays in Python and calls two step functions (three
with speculative decoding: the verify step); this module swaps them for engines built from the
same (rewritten) programs the artifact stores:

* ``aot``: each step AOT-compiled into a ``.pt2`` package with its dynamic batch, prompt
  length and cache slots symbolic, so one package serves every prompt and cache size.
* ``onnxruntime``: each step exported to ONNX (``torch.onnx.export(dynamo=True)``) with the
  same dynamic dims and run in an ``InferenceSession``. On an accelerator the decode and verify
  steps are bound with ORT's IO binding: inputs are handed over by pointer, and each KV output
  is written straight into a preallocated buffer of its input's shape (two buffers per entry,
  used in turn), so a step neither allocates nor copies the cache; the runtime keeps the buffers
  it gets back. On a CPU they run unbound (see :func:`attach_engines`).

The decode and verify steps are the functional ones (their cache write is a scatter returning a
new tensor): engines cannot write their inputs in place, so each step writes the next buffer
instead. The verify engine has the draft length T dynamic too, so one engine serves every k and
every draft tree, as the verify graph does under ``eager`` and ``inductor``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tcompile import _compat
from tcompile.errors import ArtifactError, BackendUnavailableError, CaptureError
from tcompile.lowering.capability import assess
from tcompile.runtime.lm_capture import decode_dynamic_shapes, prefill_dynamic_shapes

logger = logging.getLogger(__name__)

ENGINE_FILES = {"aot": ("lm_prefill.pt2", "lm_decode.pt2"), "onnxruntime": ("lm_prefill.onnx", "lm_decode.onnx")}
VERIFY_FILES = {"aot": "lm_verify.pt2", "onnxruntime": "lm_verify.onnx"}   # speculative runtimes only
# numpy dtypes ORT's IO binding takes for torch dtypes
_NP = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
       torch.bool: "bool", torch.float64: "float64"}


ENGINE_BATCH = 3
ENGINE_DRAFT = 5    # draft tokens in the verify engine's example (unequal to the batch and the tiny models' dims)


def _rebatch(args: tuple, batch: int) -> tuple:
    """The example step inputs with their rows repeated cyclically to ``batch`` rows.

    The captured examples have a batch of 2, which often equals other dims of the step (layers,
    KV heads: the ``slot`` input is [B, L, Hkv]). AOTInductor (torch 2.13) then compiled a decode
    step that read out of bounds at any other batch; exporting with a batch no other dim is likely
    to equal gives engines that serve every batch (tests/runtime/test_lm_backends.py checks 3).
    """
    leaves, spec = _compat.tree_flatten(args)
    old = next(int(t.shape[0]) for t in leaves if isinstance(t, torch.Tensor) and t.ndim)
    idx = torch.arange(batch) % old
    return _compat.tree_unflatten([t[idx] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == old else t
                                   for t in leaves], spec)


def engine_files(runtime: Any, backend: str) -> dict[str, str]:
    """Step -> engine file of ``backend`` for ``runtime``: prefill, decode and, for a speculative
    runtime, verify (the runtime calls step ``s`` through its ``s_fn`` attribute)."""
    files = dict(zip(("prefill", "decode"), ENGINE_FILES[backend]))
    if hasattr(runtime, "verify_fn"):
        files["verify"] = VERIFY_FILES[backend]
    return files


def _programs(runtime: Any, prefill_args: tuple, decode_args: tuple) -> dict[str, Any]:
    """Step -> the step re-exported with its dynamic dims, from examples of ``ENGINE_BATCH`` rows."""
    from tcompile.runtime.lm_artifact import _reexport
    from tcompile.runtime.verify import verify_dynamic_shapes, verify_example_args
    n_kv = 2 * runtime.spec.num_layers
    prefill_args, decode_args = _rebatch(prefill_args, ENGINE_BATCH), _rebatch(decode_args, ENGINE_BATCH)
    programs = {"prefill": _reexport(runtime.prefill_graph, prefill_args, prefill_dynamic_shapes(), "prefill"),
                "decode": _reexport(runtime.decode_graph, decode_args, decode_dynamic_shapes(n_kv), "decode")}
    if hasattr(runtime, "verify_fn"):
        device = decode_args[0].device
        verify_args = verify_example_args(runtime.spec, device, batch=ENGINE_BATCH, tokens=ENGINE_DRAFT)
        programs["verify"] = _reexport(runtime.verify_step_graph, verify_args, verify_dynamic_shapes(n_kv), "verify")
    return programs


def _refuse_unsupported(backend: str, programs: dict[str, Any]) -> None:
    for stage, program in programs.items():
        bad = assess(backend, program.graph_module).unsupported
        if bad:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot take {', '.join(bad)} in the {stage} step (no ONNX translation for "
                "tcompile's custom ops); use backend='aot', 'inductor' or 'eager', or drop the pass that inserts them")


def build_engines(runtime: Any, backend: str, prefill_args: tuple, decode_args: tuple, workdir: Path) -> list[str]:
    """Write the step engines of ``backend`` into ``workdir`` (:func:`engine_files`); returns their file names."""
    programs = _programs(runtime, prefill_args, decode_args)
    _refuse_unsupported(backend, programs)
    files = engine_files(runtime, backend)
    workdir.mkdir(parents=True, exist_ok=True)
    for step, program in programs.items():
        logger.info("%s: building %s", backend, files[step])
        if backend == "aot":
            from tcompile.lowering.aot import compile_package
            compile_package(program, workdir / files[step])
        else:
            _export_onnx(program, workdir / files[step])
    return list(files.values())


def _export_onnx(program: Any, path: Path) -> None:
    from tcompile.lowering.onnxruntime import _require_onnx
    _require_onnx()
    try:
        onnx_program = torch.onnx.export(program, (), dynamo=True, verbose=False)
    except Exception as exc:
        raise CaptureError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {exc}") from exc
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx_program.save(str(path))


def attach_engines(runtime: Any, backend: str, directory: Path, io_binding: bool | None = None) -> None:
    """Point ``runtime``'s step functions at the engines in ``directory`` (written by :func:`build_engines`).

    A speculative runtime's verify step is pointed at its engine too; a missing engine file is
    an :class:`ArtifactError` naming it.

    ``io_binding`` (ONNX Runtime): run the decode and verify steps through IO binding, the cache
    outputs written into preallocated buffers. None (the default) binds only where the session runs on
    an accelerator: on a CPU, binding SmolLM2's 60 cache tensors per step did not pay consistently
    (its decode ran 2.75x eager's tokens/s unbound against 2.41x bound, then 2.12x against 2.15x,
    on the AVX-512 build machine; 2.13x against 2.06x and 1.87x against 1.85x on the AVX2 one:
    ``bench/lowering_speed.py --part lm``, bench/RESULTS.md §8), so the plain call is the default."""
    files = engine_files(runtime, backend)
    missing = [name for name in files.values() if not (directory / name).exists()]
    if missing:
        raise ArtifactError(f"{directory} lacks the {backend} engine file(s) {missing} this runtime needs; "
                            "re-export the artifact (or rebuild the engines with lower_lm)")
    if backend == "aot":
        from tcompile.lowering.aot import AotModule
        for step, name in files.items():
            setattr(runtime, f"{step}_fn", AotModule(directory / name))
        return
    engines = {step: OrtStep(directory / name) for step, name in files.items()}
    if io_binding is None:
        io_binding = engines["prefill"].session.get_providers()[0] != "CPUExecutionProvider"
    n_kv = 2 * runtime.spec.num_layers
    for step, engine in engines.items():
        if io_binding and step != "prefill":
            # decode (ids, positions, valid, slot, K0, V0, ...) and verify (ids, positions, attend, slot,
            # K0, V0, ...) -> (logits, K0', V0', ..., scores...): output 1 + i is written over input 4 + i
            engine.alias = {1 + i: 4 + i for i in range(n_kv)}
        setattr(runtime, f"{step}_fn", engine)


class OrtStep:
    """One step graph in an ONNX Runtime session, called with the step's torch arguments.

    ``alias`` maps output index -> input index for outputs of the same shape as that input (the
    KV cache): with it the step runs through IO binding and writes those outputs into
    preallocated torch buffers, alternating between two per output so an output never
    overwrites the input it is computed from.
    """

    def __init__(self, path: Path, alias: dict[int, int] | None = None, providers: list[str] | None = None) -> None:
        from tcompile.lowering.onnxruntime import _require_onnx, default_providers
        ort = _require_onnx()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=providers or default_providers(ort))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.alias = alias
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self._turn = 0

    def _leaves(self, args: tuple) -> list[torch.Tensor]:
        leaves = [x for x in _compat.tree_flatten(args)[0] if isinstance(x, torch.Tensor)]
        if len(leaves) != len(self.inputs):
            raise CaptureError(f"{self.path.name} takes {len(self.inputs)} tensors ({', '.join(self.inputs)}), "
                               f"got {len(leaves)}")
        return [t.detach().contiguous() for t in leaves]

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        leaves = self._leaves(args)
        if self.alias is None:
            outs = self.session.run(None, {n: t.cpu().numpy() for n, t in zip(self.inputs, leaves)})
            return tuple(torch.from_numpy(o) for o in outs)
        return self._run_bound(leaves)

    def _buffer(self, out: int, like: torch.Tensor) -> torch.Tensor:
        pair = self._buffers.get(out)
        if pair is None or pair[0].shape != like.shape or pair[0].dtype != like.dtype:
            pair = self._buffers[out] = [torch.empty_like(like), torch.empty_like(like)]
        buf = pair[self._turn]
        if buf.data_ptr() == like.data_ptr():   # the caller passed back this very buffer: use the other one
            buf = pair[1 - self._turn]
        return buf

    def _run_bound(self, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        import numpy as np
        binding = self.session.io_binding()
        for name, t in zip(self.inputs, leaves):
            binding.bind_input(name, "cpu", 0, np.dtype(_NP[t.dtype]), list(t.shape), t.data_ptr())
        bound: dict[int, torch.Tensor] = {}
        for i, name in enumerate(self.outputs):
            if i in self.alias:
                buf = self._buffer(i, leaves[self.alias[i]])
                binding.bind_output(name, "cpu", 0, np.dtype(_NP[buf.dtype]), list(buf.shape), buf.data_ptr())
                bound[i] = buf
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        self._turn = 1 - self._turn
        values = binding.get_outputs()
        return tuple(bound[i] if i in bound else torch.from_numpy(values[i].numpy()) for i in range(len(self.outputs)))
