"""SmolLM2's verify step: its cost against the number of draft tokens T and against a one-token
decode step, and its logits against eager's.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/verify_cost.py [--backend onnxruntime] [--tokens 1 2 5 9 17]
       [--rounds 7] [--settings-ab]

Why: a speculative step pays off only if scoring T tokens costs little more than decoding one,
so each backend's cost curve in T bounds what any drafter can gain on it (bench/RESULTS.md §9).
The cache is real: the eager prefill of bench/speculative.py's story prompt (46 tokens), with
``--free`` empty slots after it (the runtime grows its buffers in steps). Each T scores the next
greedy token followed by the prompt's last T − 1 tokens as a causal chain, through
``runtime.verify_fn`` lowered to ``--backend`` (``lower_lm``, as ``tcompile.optimize`` does);
the decode step writes that next token at the same cache. Calls are interleaved, median seconds
per call over ``--rounds``. The logits are compared with the eager verify graph's on the same
inputs (max |difference|, argmax agreement).

``--settings-ab`` (inductor): the decode and verify steps are compiled once per variant of
Inductor's step settings (``tcompile.lowering.inductor.STEP_SETTINGS``): Inductor's defaults, serial
kernels alone, serial kernels with each other setting, and all of them (what ``lower_lm`` does),
all timed in the same rounds.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from bench_common import interleaved_medians, save
from speculative import STORY, chat_ids
from tcompile.lowering.inductor import STEP_SETTINGS, compile_for_inference
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import lower_lm, runtime_for


def setting_variants() -> dict[str, tuple[str, ...]]:
    """Variant name -> step settings: none, serial kernels alone, serial kernels plus each other
    setting, and all of them."""
    others = [name for name in STEP_SETTINGS if name != "serial_kernels"]
    out = {"inductor defaults": (), "serial_kernels": ("serial_kernels",)}
    out.update({f"serial_kernels+{name}": ("serial_kernels", name) for name in others})
    out["all step settings"] = tuple(STEP_SETTINGS)
    return out


def steps_to_time(runtime, program, backend: str, settings_ab: bool) -> dict[str, tuple]:
    """Variant name -> (decode step, verify step) callables: the lowered runtime's, or with
    ``settings_ab`` one inductor compilation per variant of private copies of the eager steps (a
    copy of a GraphModule has its own code, so Dynamo compiles it afresh instead of reusing
    another's)."""
    if not settings_ab:
        lower_lm(runtime, backend, (program.prefill.example_args, program.decode.example_args))
        return {"": (runtime.decode_fn, runtime.verify_fn)}
    if backend != "inductor":
        raise SystemExit("--settings-ab compares Inductor's step settings: use it with --backend inductor")
    return {name: tuple(compile_for_inference(copy.deepcopy(fn), on_cpu=True, dynamic=True, step_settings=settings)
                        for fn in (runtime.decode_fn, runtime.verify_fn))
            for name, settings in setting_variants().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime", choices=["eager", "inductor", "onnxruntime", "aot"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 17])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--free", type=int, default=100, help="empty cache slots after the prompt's entries")
    ap.add_argument("--settings-ab", action="store_true", help="inductor: each variant of the step settings")
    ap.add_argument("--out", default=None, help="result name (default verify_cost_<backend>)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    program = capture_lm(model, "SmolLM2-135M-Instruct", verify=True)
    runtime = runtime_for(program, [PassSpec("speculative", SpeculativeOptions(drafter="prompt_lookup"))], model)[0]
    spec, ids = program.spec, chat_ids(tok, STORY)
    n = ids.shape[1]
    with torch.no_grad():
        prefill = program.prefill.gm(ids, torch.ones_like(ids))
    first = int(prefill[0].argmax())
    slots = n + max(args.tokens) + args.free

    def cache() -> tuple:
        return tuple(torch.cat([c, c.new_zeros(c.shape[0], c.shape[1], slots - n, c.shape[3])], dim=2)
                     for c in prefill[1:])

    def verify_args(t: int) -> tuple:
        draft = torch.cat([torch.tensor([first]), ids[0, n - t + 1:]])[None]
        attend = torch.zeros(1, t, slots, dtype=torch.bool)
        attend[0, :, :n] = True
        attend[0, :, n:n + t] = torch.ones(t, t, dtype=torch.bool).tril()
        slot = (n + torch.arange(t)).expand(1, spec.num_layers, spec.kv_heads, t).contiguous()
        return (draft, (n + torch.arange(t))[None], attend, slot, cache())

    valid = torch.zeros(1, slots, dtype=torch.bool)
    valid[0, :n + 1] = True
    decode_args = (torch.tensor([[first]]), torch.tensor([[n]]), valid,
                   torch.full((1, spec.num_layers, spec.kv_heads), n), cache())
    inputs = {t: verify_args(t) for t in args.tokens}
    started = time.perf_counter()
    variants = steps_to_time(runtime, program, args.backend, args.settings_ab)
    fns = {}
    for name, (decode, verify) in variants.items():
        fns[f"{name} decode".strip()] = lambda f=decode: f(*decode_args)
        fns.update({f"{name} T={t}".strip(): (lambda f=verify, a=a: f(*a)) for t, a in inputs.items()})
    with torch.no_grad():
        for fn in fns.values():   # compile (inductor) before timing, so build_s covers it
            fn()
    build_s = time.perf_counter() - started
    timed = interleaved_medians(fns, args.rounds)
    with torch.no_grad():   # the eager verify graph's logits, once per T for every variant
        wanted = {t: runtime.verify_step_graph(*a)[0] for t, a in inputs.items()}
    rows = []
    for name, (decode, verify) in variants.items():
        one = timed[f"{name} decode".strip()]["median"]
        print(f"{name or args.backend}: decode step {1e3 * one:.1f} ms", flush=True)
        for t, a in inputs.items():
            want = wanted[t]
            with torch.no_grad():
                got = verify(*a)[0]
            ms = timed[f"{name} T={t}".strip()]["median"]
            row = {"variant": name or args.backend, "tokens": t, "ms": 1e3 * ms, "decode_ms": 1e3 * one,
                   "vs_decode": ms / one, "max_abs_logit_diff": float((got - want).abs().max()),
                   "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all())}
            rows.append(row)
            print(f"  T={t:3d}: {row['ms']:7.1f} ms  x{row['vs_decode']:.2f} the decode step  max|logits - eager| "
                  f"{row['max_abs_logit_diff']:.1e}  argmax equal {row['argmax_equal']}", flush=True)
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/verify_cost.py", *sys.argv[1:]])
    payload = {"command": command, "backend": args.backend, "prompt_tokens": n, "cache_slots": slots,
               "build_s": build_s, "rounds": args.rounds, "rows": rows}
    print(f"written {save(args.out or f'verify_cost_{args.backend}', payload)}")


if __name__ == "__main__":
    main()
