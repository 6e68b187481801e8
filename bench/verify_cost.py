"""SmolLM2's verify step: its cost against the number of draft tokens T, and its logits against eager's.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/verify_cost.py [--backend onnxruntime] [--tokens 1 2 5 9 17]
       [--rounds 7]

Why: a speculative step pays off only if scoring T tokens costs little more than scoring one, so
each backend's cost curve in T bounds what any drafter can gain on it (bench/RESULTS.md §9). The
cache is real: the eager prefill of bench/speculative.py's story prompt (46 tokens). Each T scores
the next greedy token followed by the prompt's last T − 1 tokens as a causal chain, through
``runtime.verify_fn`` lowered to ``--backend`` (``lower_lm``, as ``tcompile.optimize`` does);
calls of every T are interleaved, median seconds per call over ``--rounds``. The logits are
compared with the eager verify graph's on the same inputs (max |difference|, argmax agreement).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench_common import interleaved_medians, save
from speculative import STORY, chat_ids
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import lower_lm, runtime_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="onnxruntime", choices=["eager", "inductor", "onnxruntime", "aot"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 17])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="result name (default verify_cost_<backend>)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    program = capture_lm(model, "SmolLM2-135M-Instruct", verify=True)
    runtime = runtime_for(program, [PassSpec("speculative", SpeculativeOptions(drafter="prompt_lookup"))], model)[0]
    started = time.perf_counter()
    lower_lm(runtime, args.backend, (program.prefill.example_args, program.decode.example_args))
    build_s = time.perf_counter() - started
    spec, ids = program.spec, chat_ids(tok, STORY)
    n = ids.shape[1]
    with torch.no_grad():
        prefill = program.prefill.gm(ids, torch.ones_like(ids))
    first = int(prefill[0].argmax())

    def step_args(t: int) -> tuple:
        kv = tuple(torch.cat([c, torch.zeros_like(c[:, :, :t])], dim=2) for c in prefill[1:])
        draft = torch.cat([torch.tensor([first]), ids[0, n - t + 1:]])[None]
        attend = torch.ones(1, t, n + t, dtype=torch.bool)
        attend[0, :, n:] = torch.ones(t, t, dtype=torch.bool).tril()
        slot = (n + torch.arange(t)).expand(1, spec.num_layers, spec.kv_heads, t).contiguous()
        return (draft, (n + torch.arange(t))[None], attend, slot, kv)

    inputs = {t: step_args(t) for t in args.tokens}
    timed = interleaved_medians({f"T={t}": (lambda a=a: runtime.verify_fn(*a)) for t, a in inputs.items()},
                                args.rounds)
    rows = []
    one = timed[f"T={min(args.tokens)}"]["median"]
    for t, a in inputs.items():
        with torch.no_grad():
            want = runtime.verify_step_graph(*a)[0]
            got = runtime.verify_fn(*a)[0]
        row = {"tokens": t, "ms": 1e3 * timed[f"T={t}"]["median"], "vs_smallest_T": timed[f"T={t}"]["median"] / one,
               "max_abs_logit_diff": float((got - want).abs().max()),
               "argmax_equal": bool((got.argmax(-1) == want.argmax(-1)).all())}
        rows.append(row)
        print(f"T={t:3d}: {row['ms']:7.1f} ms  x{row['vs_smallest_T']:.2f}  max|logits - eager| "
              f"{row['max_abs_logit_diff']:.1e}  argmax equal {row['argmax_equal']}", flush=True)
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/verify_cost.py", *sys.argv[1:]])
    payload = {"command": command, "backend": args.backend, "prompt_tokens": n, "build_s": build_s,
               "rounds": args.rounds, "rows": rows}
    print(f"written {save(args.out or f'verify_cost_{args.backend}', payload)}")


if __name__ == "__main__":
    main()
