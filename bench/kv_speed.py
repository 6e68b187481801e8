"""SmolLM2 decode speed and KV-cache bytes, tcompile beside kvpress, measured in one run.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/kv_speed.py [--contexts 2048 4096] [--rounds 3]
(PASSIVE: OpenMP threads that spin while waiting make a loaded 2-core machine 5x slower.)

Each round times tcompile's full cache and its 25% passes in this process (eager, and with
--backends inductor also with the decode step compiled by torch.compile), then runs kvpress
(bench/kvpress_peer.py, its own venv .venv-kvpress: full cache, SnapKVPress(0.75),
StreamingLLMPress(0.75)) in a subprocess; rounds alternate so both see the same machine load.
ms/token: median over the 31 decode steps producing tokens 2..32 of one generation (EOS
ignored); each figure below is the median of those over the rounds. Cache bytes: K and V
buffers actually allocated, at their peak while decoding.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import save
from needle import needle_prompt_ids
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.registry import parse_pipeline
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_optimize import lower_lm, runtime_for

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE.parent / ".venv-kvpress" / "bin" / "python"
# The passes kvpress also has (its SnapKVPress and StreamingLLMPress are timed beside them).
OURS = {"full": "", "kv_snapkv 25%": "kv_snapkv{ratio=0.25}", "kv_streaming 25%": "kv_streaming{ratio=0.25,sinks=4}"}
PEER_NAMES = {"none": "kvpress full", "SnapKVPress@0.75": "kvpress SnapKVPress 25%",
              "StreamingLLMPress@0.75": "kvpress StreamingLLMPress 25%"}
NEW_TOKENS = 32


def ours_round(runtimes: dict, prompts: dict) -> dict:
    rows: dict = {}
    for ctx, ids in prompts.items():
        for name, rt in runtimes.items():
            rt.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
            s = rt.last_stats
            rows.setdefault(ctx, {})[name] = {"ms_per_token": s.ms_per_token(), "peak_cache_bytes": s.peak_cache_bytes,
                                              "full_cache_bytes": s.full_cache_bytes}
            print(f"  tcompile ctx {ctx} {name}: {s.ms_per_token():.1f} ms/token, cache "
                  f"{s.peak_cache_bytes / 2**20:.1f} MiB", flush=True)
    return rows


def peer_round(contexts: list[int]) -> dict | None:
    if not PEER_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        subprocess.run([str(PEER_PYTHON), str(HERE / "kvpress_peer.py"), "--contexts", "--speed-contexts",
                        *map(str, contexts), "--no-streaming-ids", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        speed = json.loads(out.read_text())["speed"]
    rows = {}
    for ctx, per in speed.items():
        for label, row in per.items():
            rows.setdefault(int(ctx), {})[PEER_NAMES.get(label, f"kvpress {label}")] = {
                "ms_per_token": row["ms_per_token_median"], "peak_cache_bytes": row["kv_bytes"]}
            print(f"  kvpress ctx {ctx} {label}: {row['ms_per_token_median']:.1f} ms/token", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "inductor"])
    ap.add_argument("--out", default="kv_speed")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    program = capture_lm(model, "SmolLM2-135M-Instruct")
    runtimes = {}
    for backend in args.backends:
        for name, p in OURS.items():
            rt = runtime_for(program, parse_pipeline(p) if p else [])[0]
            lower_lm(rt, backend)
            runtimes[name if backend == "eager" else f"{name} ({backend})"] = rt
    warm = torch.tensor([needle_prompt_ids(tok, 256, 0.1, 123456)])
    for rt in runtimes.values():   # compile (inductor) and first-call allocations outside the timed rounds
        rt.generate(warm, max_new_tokens=3, eos_token_id=[])
    prompts = {ctx: torch.tensor([needle_prompt_ids(tok, ctx, 0.1, 123456)]) for ctx in args.contexts}
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        started = time.time()
        rows = ours_round(runtimes, prompts)
        for ctx, per in (peer_round(args.contexts) or {}).items():
            rows[ctx].update(per)
        rounds.append(rows)
        print(f"  round took {time.time() - started:.0f}s", flush=True)
    table: dict = {}
    for ctx in args.contexts:
        for name in rounds[0][ctx]:
            ms = [rd[ctx][name]["ms_per_token"] for rd in rounds]
            table.setdefault(str(ctx), {})[name] = {"ms_per_token": statistics.median(ms), "rounds": ms,
                                                    "peak_cache_bytes": rounds[-1][ctx][name]["peak_cache_bytes"]}
        rows = table[str(ctx)]
        for name, row in rows.items():
            row["cache_fraction_of_full"] = row["peak_cache_bytes"] / rounds[-1][ctx]["full"]["full_cache_bytes"]
            own_full = "kvpress full" if name.startswith("kvpress") else "full" + name[name.find(" ("):] * (" (" in name)
            if own_full in rows:
                row["speedup_vs_own_full"] = rows[own_full]["ms_per_token"] / row["ms_per_token"]
    print(json.dumps(table, indent=1))
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python " + " ".join(["bench/kv_speed.py", *sys.argv[1:]])
    print(f"written {save(args.out, {'command': command, 'new_tokens': NEW_TOKENS, 'rounds': args.rounds, 'table': table})}")


if __name__ == "__main__":
    main()
