"""SmolLM2 speculative decoding: tokens/s of each drafter vs plain greedy and vs transformers.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/speculative.py [--rounds 3] [--new 96]
       [--backend eager|inductor|onnxruntime|aot] [--drafters NAME ...] [--tasks copy story] [--warm 80]

Two greedy tasks, 96 new tokens each (EOS ignored by every method):
(a) input-grounded: a chat prompt asking to copy a pydoc passage (~480 tokens);
(b) open generation: a short story prompt.
Methods: tcompile's plain greedy runtime; tcompile speculative with each drafter; transformers'
``model.generate`` plain and with ``prompt_lookup_num_tokens=10``. ``--backend`` lowers every
tcompile runtime (plain greedy included) the same way (``lower_lm``); transformers stays eager.
With an engine backend (onnxruntime, aot) the engines are built once, from the first speculative
runtime (prefill, decode, verify), and every other runtime runs the same engine files: no runtime
here has a pass that changes those graphs, only its drafter differs.
Rounds are interleaved (one call of each method per task per round); each figure is the median
over rounds of tokens/s (new tokens / wall time of the whole generate call, prefill included);
ratios are of medians in this run. token_recycling's adjacency matrix is warmed on ``--warm``
other requests and restored before every timed call, so it never holds what it learnt from the
timed prompt itself. layer_skip chooses its skipped layers on held-out pydoc text. Every
speculative output is checked token for token against tcompile's plain greedy output.
Each tcompile row also reports its median step (decode or verify step, no prefill) and each
speculative row its mean step split into the verify call, the drafter's work and the rest
(``SpeculativeStats.step_split_ms``), to set against plain greedy's one-token step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench_common import save
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.models.needle import perplexity_text
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.lm_lowering import ENGINE_FILES, attach_engines
from tcompile.runtime.lm_optimize import lower_lm, runtime_for

DRAFTERS = {
    "prompt_lookup k=10": SpeculativeOptions(drafter="prompt_lookup", k=10),
    "prompt_lookup k=16": SpeculativeOptions(drafter="prompt_lookup", k=16),
    "prompt_lookup k=10 branches=3": SpeculativeOptions(drafter="prompt_lookup", k=10, branches=3),
    "token_recycling 8 nodes": SpeculativeOptions(drafter="token_recycling", k=4, tree_nodes=8),
    "token_recycling 12 nodes": SpeculativeOptions(drafter="token_recycling", k=5, tree_nodes=12),
    "token_recycling 16 nodes": SpeculativeOptions(drafter="token_recycling", k=6, tree_nodes=16),
    "token_recycling 32 nodes": SpeculativeOptions(drafter="token_recycling", k=8, tree_nodes=32),
    "layer_skip": SpeculativeOptions(drafter="layer_skip", k=4, fallback=0.3),
}
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Other requests served before the timed ones: token_recycling's matrix persists across requests
# (the paper's hot start: it inherits the matrix of every earlier query of the benchmark). None is
# a timed prompt, and none is about the sea, lighthouses or bottles (the story task's topic).
WARM = ["Explain how a hash table works, with an example in Python.",
        "Tell me a story about a dragon who is afraid of the dark.",
        "Write a short story about a girl who builds a robot in her garage.",
        "Describe a walk through a forest in autumn.",
        "Write a story about two friends who get lost in a big city.",
        "What are the main causes of the French Revolution?",
        "Write a poem about the first snow of winter.",
        "Tell me about the history of the Roman Empire.",
        "How do I bake bread at home?",
        "Write a story about a cat who wants to fly.",
        "Explain photosynthesis to a child.",
        "Write a short story about an old man and his dog.",
        "What is machine learning?",
        "Describe a busy market in the morning.",
        "Write a letter to a friend about your holiday in the mountains.",
        "Tell me a story about a knight and a princess.",
        "Write a short story about a boy who finds a map in the attic.",
        "Explain why the sky is blue.",
        "Write a fairy tale about a talking tree.",
        "Describe your perfect day.",
        "Write a story about a detective who solves a mystery in a small village.",
        "How does a car engine work?",
        "Write a short story about a robot who learns to paint.",
        "Give me tips for studying for an exam.",
        "Tell me a story about a girl who can talk to animals.",
        "Explain the water cycle.",
        "Write a story about a family that moves to a new town.",
        "What are the benefits of regular exercise?",
        "Write a short story about a wizard who loses his wand.",
        "Describe a thunderstorm in a city at night.",
        "Write a story about a baker who makes a magic cake.",
        "How do airplanes stay in the air?",
        "Tell me a story about a boy and his grandfather who go camping.",
        "Write a short story about a musician who plays for the king.",
        "Explain how vaccines work.",
        "Write a story about a mouse who lives in a library.",
        "What should I pack for a trip to Paris?",
        "Write a short story about a farmer who finds a golden egg.",
        "Tell me a story about a time traveller who visits the future.",
        "Write a story about a teacher and her most curious student.",
        "Explain how the internet works.",
        "Write a short story about a girl who plants a magic seed.",
        "What are the planets of the solar system?",
        "Tell me a story about a bear who cannot sleep in winter.",
        "How do I make a cup of good coffee?",
        "Write a story about a clockmaker whose clocks start to run backwards.",
        "Describe a summer festival in a small town.",
        "Explain the difference between weather and climate.",
        "Write a short story about two rival chefs.",
        "Tell me a story about a fox who tricks a crow.",
        "What is the history of the bicycle?",
        "Write a story about an astronaut who finds a garden on the moon.",
        "Give me advice for my first job interview.",
        "Write a short story about a painter who can paint the future.",
        "Explain how bees make honey.",
        "Tell me a story about a village that has no music.",
        "Write a story about a girl who wins a chess tournament.",
        "How do volcanoes form?",
        "Write a short story about a lost puppy who finds its way home.",
        "Describe an old castle on a hill.",
        "Write a story about a boy who can become invisible.",
        "What makes a good friend?",
        "Tell me a story about a queen who loves gardening.",
        "Explain how a computer stores information.",
        "Write a short story about a train journey through the mountains.",
        "Write a story about a scientist who discovers a new colour.",
        "Tell me a story about a owl who teaches the other animals.",
        "What are some healthy breakfast ideas?",
        "Write a short story about a street musician in a big city.",
        "Explain what gravity is.",
        "Write a story about a giant who is very shy.",
        "Describe a library at midnight.",
        "Tell me a story about a girl who collects stars in a jar.",
        "How do trees grow?",
        "Write a short story about a postman who delivers letters to ghosts.",
        "Write a story about a town where it always rains.",
        "Explain how a rainbow forms.",
        "Tell me a story about a king who forgets his name.",
        "Write a short story about a snowman who wants to see summer.",
        "Write a story about a grandmother who tells the best stories."]


def chat_ids(tok, content: str) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def copy_prompt(tok, total: int = 482) -> torch.Tensor:
    """A 'copy this passage' chat prompt of about ``total`` tokens (pydoc's 'for' and 'while' topics)."""
    from pydoc_data.topics import topics
    passage = topics["for"].strip() + "\n\n" + topics["while"].strip()
    lines = passage.splitlines()
    while len(lines) > 1:
        ids = chat_ids(tok, "Copy the following passage exactly, word for word:\n\n" + "\n".join(lines))
        if ids.shape[1] <= total:
            return ids
        lines = lines[:-1]
    raise ValueError("passage too short")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--drafters", nargs="*", default=list(DRAFTERS))
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxruntime", "aot"])
    ap.add_argument("--warm", type=int, default=len(WARM),
                    help="other requests token_recycling serves first")
    ap.add_argument("--tasks", nargs="*", default=["copy", "story"], choices=["copy", "story"])
    ap.add_argument("--out", default="speculative")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    started = time.time()
    program = capture_lm(model, "SmolLM2-135M-Instruct", verify=True)
    print(f"captured in {time.time() - started:.0f}s", flush=True)
    calibration = torch.tensor([tok.encode(perplexity_text()[:3000])])[:, :256]
    runtimes = {"tcompile greedy": runtime_for(program, [])[0]}
    for name in args.drafters:
        opts = DRAFTERS[name]
        if opts.drafter == "layer_skip":
            from tcompile.runtime.model_drafters import choose_skip
            skip = choose_skip(model, calibration, opts.k, opts.skip_ratio)
            opts = SpeculativeOptions(**{**opts.__dict__, "skip": skip})
        runtimes[name] = runtime_for(program, [PassSpec("speculative", opts)], model)[0]
        if opts.drafter == "layer_skip":
            print(f"layer_skip skips layers {opts.skip}", flush=True)
    engines = None
    for rt in sorted(runtimes.values(), key=lambda r: not hasattr(r, "verify_fn")):   # a speculative one first
        if args.backend in ENGINE_FILES and engines is not None:
            attach_engines(rt, args.backend, engines[0])
            continue
        t0 = time.time()
        engines = lower_lm(rt, args.backend, (program.prefill.example_args, program.decode.example_args))
        print(f"lowered to {args.backend} in {time.time() - t0:.0f}s", flush=True)
    tasks = {"copy (input-grounded)": copy_prompt(tok), "story (open)": chat_ids(tok, STORY)}
    tasks = {name: ids for name, ids in tasks.items() if name.split()[0] in args.tasks}
    for task, ids in tasks.items():
        print(f"{task}: {ids.shape[1]} prompt tokens", flush=True)
    snapshots = {}
    for name, rt in runtimes.items():   # warm-up (and token_recycling's matrix, on other prompts)
        rt.generate(chat_ids(tok, WARM[0]), max_new_tokens=16, eos_token_id=[])
        if hasattr(rt, "drafter") and hasattr(rt.drafter, "adjacency"):
            for text in WARM[:args.warm]:
                rt.generate(chat_ids(tok, text), max_new_tokens=args.new, eos_token_id=[])
            snapshots[name] = (rt.drafter.adjacency.clone(), rt.drafter.known.clone())
            print(f"{name}: matrix warmed on {args.warm} other requests, {int(rt.drafter.known.sum())} rows known",
                  flush=True)
    model.generation_config.eos_token_id = None   # transformers too generates all the new tokens

    def hf(ids: torch.Tensor, **kw) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                  do_sample=False, pad_token_id=0, **kw)

    hf(chat_ids(tok, STORY))
    hf(chat_ids(tok, STORY), prompt_lookup_num_tokens=10)
    times: dict = {t: {} for t in tasks}
    stats: dict = {t: {} for t in tasks}
    outputs: dict = {t: {} for t in tasks}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for task, ids in tasks.items():
            for name, rt in runtimes.items():
                if name in snapshots:
                    rt.drafter.adjacency.copy_(snapshots[name][0])
                    rt.drafter.known.copy_(snapshots[name][1])
                t0 = time.perf_counter()
                out = rt.generate(ids, max_new_tokens=args.new, eos_token_id=[])
                times[task].setdefault(name, []).append(args.new / (time.perf_counter() - t0))
                outputs[task][name] = out[0, ids.shape[1]:].tolist()
                s = rt.last_stats
                step_ms = stats[task].setdefault(name, {}).setdefault("step_ms_rounds", [])
                step_ms.append(1e3 * statistics.median(s.decode_s))    # one decode or verify step
                if hasattr(s, "summary"):
                    keep = ("steps", "drafted", "accepted", "acceptance_rate", "mean_accepted_length")
                    stats[task][name].update({k: s.summary()[k] for k in keep})
                    for part, ms in s.step_split_ms().items():   # mean ms per step: verify, draft, other
                        stats[task][name].setdefault(f"mean_{part}_rounds", []).append(ms)
            for name, kw in (("transformers greedy", {}),
                             ("transformers prompt_lookup=10", {"prompt_lookup_num_tokens": 10})):
                t0 = time.perf_counter()
                out = hf(ids, **kw)
                times[task].setdefault(name, []).append(args.new / (time.perf_counter() - t0))
                outputs[task][name] = out[0, ids.shape[1]:].tolist()
            print("  " + task + ": " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in times[task].items()) + " tok/s",
                  flush=True)
    table: dict = {}
    for task in tasks:
        med = {name: statistics.median(v) for name, v in times[task].items()}
        base, peer = med["tcompile greedy"], med["transformers prompt_lookup=10"]
        rows = {}
        for name, m in med.items():
            same_round = [a / g for a, g in zip(times[task][name], times[task]["tcompile greedy"])]
            rows[name] = {"tokens_per_s": m, "rounds": times[task][name], "speedup_vs_tcompile_greedy": m / base,
                          "same_round_speedups": same_round,
                          "vs_transformers_prompt_lookup": m / peer,
                          "speedup_vs_transformers_greedy": m / med["transformers greedy"],
                          "equals_tcompile_greedy": outputs[task][name] == outputs[task]["tcompile greedy"],
                          **stats[task].get(name, {})}
        table[task] = {"prompt_tokens": int(tasks[task].shape[1]), "rows": rows,
                       "text": tok.decode(outputs[task]["tcompile greedy"])}
        print(f"\n{task} ({tasks[task].shape[1]} prompt tokens)")
        for name, row in rows.items():
            extra = f", step {statistics.median(row['step_ms_rounds']):.0f} ms" if "step_ms_rounds" in row else ""
            if "mean_verify_ms_rounds" in row:    # each round's mean step, split
                split = {part: statistics.median(row[f"mean_{part}_ms_rounds"])
                         for part in ("step", "verify", "draft", "other")}
                extra += (f", mean step {split['step']:.1f} ms (verify {split['verify']:.1f},"
                          f" draft {split['draft']:.1f}, other {split['other']:.1f})")
            if name != "tcompile greedy":
                extra += ", same-round x" + "/".join(f"{v:.2f}" for v in row["same_round_speedups"])
            extra += f", mean accepted {row['mean_accepted_length']:.2f}" if "mean_accepted_length" in row else ""
            print(f"  {name:34s} {row['tokens_per_s']:6.1f} tok/s  x{row['speedup_vs_tcompile_greedy']:.2f} vs greedy"
                  f"  x{row['vs_transformers_prompt_lookup']:.2f} vs HF lookup"
                  f"  same={row['equals_tcompile_greedy']}{extra}")
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python " + " ".join(["bench/speculative.py", *sys.argv[1:]])
    payload = {"command": command, "backend": args.backend, "new_tokens": args.new, "rounds": args.rounds,
               "warm_requests": args.warm, "table": table}
    print(f"written {save(args.out, payload)}")


if __name__ == "__main__":
    main()
