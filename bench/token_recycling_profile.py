"""Token Recycling on SmolLM2: how often the next token is in its predecessor's matrix row, and at which rank.

Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/token_recycling_profile.py [--warm 60] [--nodes 8 16 32]
       [--prompt-rows]

Why: a static draft tree only pays if its nodes are the rank paths that get accepted. This bench
serves ``--warm`` of bench/speculative.py's other requests and then its story prompt with
``speculative{drafter=token_recycling}`` (eager, greedy, 96 new tokens, a ``--tree``-node tree),
and records for every emitted token its rank in the matrix row of the token before it, read just
before the verify step's update (ranks 0..top_k-1; ``miss``: not in the row; ``unknown``: the row
was never written). From that rank sequence it counts, for each rank path (c1, ..., cd), the share
of positions where the next d tokens have exactly those ranks: a draft tree holding a path
accepts its node there. Expected tokens per verify step = 1 + the sum of those shares over the
tree's paths. The table compares the default tree (``budget_tree``, an assumed rank profile) with
the tree of the same size fitted to the measured warm-up profile (Sequoia-style: ``budget_tree``
scoring paths by their measured share), on the warm-up requests and on the story. Exactness and
speed are bench/speculative.py's job; this measures acceptance only.

``--prompt-rows`` tries a cold start some Token Recycling implementations use and tcompile's
runtime does not: before each request, every prompt token's row is written from a full-logits
forward of the prompt (the prefill graph returns only the last position's logits).
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

from bench_common import save
from speculative import STORY, WARM, chat_ids
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.drafters import budget_tree
from tcompile.runtime.lm_optimize import runtime_for

MISS, UNKNOWN = "miss", "unknown"


def record_ranks(drafter, ranks: list) -> None:
    """Wrap ``drafter.observe`` so each step appends the ranks of the emitted tokens (the accepted
    path and the bonus token) in their predecessors' rows, before the rows are overwritten."""
    observe = drafter.observe

    def wrapped(inputs, logits, accepted, nodes=None):
        for row, path in enumerate(accepted):
            if not path:
                continue
            tokens = [int(inputs[row, i]) for i in path] + [int(logits[row, path[-1]].argmax())]
            for prev, token in zip(tokens, tokens[1:]):
                if not bool(drafter.known[prev]):
                    ranks.append(UNKNOWN)
                    continue
                hit = (drafter.adjacency[prev] == token).nonzero().flatten()
                ranks.append(int(hit[0]) if len(hit) else MISS)
        observe(inputs, logits, accepted, nodes)
    drafter.observe = wrapped


def write_prompt_rows(drafter, model) -> None:
    """Make ``drafter.reset`` write each prompt token's row from the top-k of its logits."""
    def reset(prompts):
        for prompt in prompts:
            with torch.no_grad():
                logits = model(prompt.view(1, -1)).logits[0]
            drafter.adjacency[prompt] = logits.topk(drafter.top_k, dim=-1).indices.to(torch.int32)
            drafter.known[prompt] = True
    drafter.reset = reset


def path_shares(requests: list[list], depth: int) -> dict[tuple[int, ...], float]:
    """Share of positions t (over all requests) where ranks[t:t+d] equals each rank path of
    length d ≤ ``depth``; no path crosses from one request into the next."""
    counts: collections.Counter = collections.Counter()
    for ranks in requests:
        for t in range(len(ranks)):
            path: tuple[int, ...] = ()
            for r in ranks[t:t + depth]:
                if not isinstance(r, int):
                    break
                path += (r,)
                counts[path] += 1
    positions = sum(len(r) for r in requests)
    return {p: c / max(positions, 1) for p, c in counts.items()}


def expected_tokens(shares: dict[tuple[int, ...], float], tree: list[tuple[int, ...]]) -> float:
    """Tokens emitted per verify step with ``tree``: the bonus token plus each node's share."""
    return 1.0 + sum(shares.get(p, 0.0) for p in tree)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", type=int, default=60, help="other requests served before the story")
    ap.add_argument("--tree", type=int, default=32, help="draft tree nodes while recording")
    ap.add_argument("--nodes", type=int, nargs="*", default=[4, 8, 16, 24, 32])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--prompt-rows", action="store_true", help="write the prompt's rows before each request")
    ap.add_argument("--out", default="token_recycling_profile")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    program = capture_lm(model, "SmolLM2-135M-Instruct", verify=True)
    options = SpeculativeOptions(drafter="token_recycling", k=args.depth, tree_nodes=args.tree)
    runtime = runtime_for(program, [PassSpec("speculative", options)], model)[0]
    top_k = runtime.drafter.top_k
    if args.prompt_rows:
        write_prompt_rows(runtime.drafter, model)
    ranks: list = []
    record_ranks(runtime.drafter, ranks)
    warm_requests: list[list] = []
    accepted = []
    for i, text in enumerate(WARM[:args.warm]):
        runtime.generate(chat_ids(tok, text), max_new_tokens=96, eos_token_id=[])
        warm_requests.append(ranks[:])
        ranks.clear()
        accepted.append(runtime.last_stats.mean_accepted_length)
        print(f"warm {i + 1}/{args.warm}: {accepted[-1]:.2f} tokens/step", flush=True)
    runtime.generate(chat_ids(tok, STORY), max_new_tokens=96, eos_token_id=[])
    story_requests = [ranks[:]]
    profile = {}
    for name, requests in (("warm", warm_requests), ("story", story_requests)):
        flat = [r for req in requests for r in req]
        n = len(flat)
        profile[name] = {"positions": n, **{f"rank {r}": flat.count(r) / n for r in range(top_k)},
                         MISS: flat.count(MISS) / n, UNKNOWN: flat.count(UNKNOWN) / n}
        print(f"{name}: {n} positions; " + ", ".join(f"{k} {v:.3f}" for k, v in profile[name].items()
                                                   if k != "positions"))
    warm, story = path_shares(warm_requests, args.depth), path_shares(story_requests, args.depth)
    rows = []
    print(f"\n{'nodes':>5}  {'default tree: warm':>18}  {'story':>6}  {'fitted on warm: warm':>20}  {'story':>6}")
    for nodes in args.nodes:
        default = budget_tree(nodes, top_k, args.depth)
        fitted = budget_tree(nodes, top_k, args.depth, chance=lambda p: warm.get(p, 0.0))
        row = {"nodes": nodes, "default_warm": expected_tokens(warm, default),
               "default_story": expected_tokens(story, default), "fitted_warm": expected_tokens(warm, fitted),
               "fitted_story": expected_tokens(story, fitted), "fitted_tree": fitted}
        rows.append(row)
        print(f"{nodes:5d}  {row['default_warm']:18.3f}  {row['default_story']:6.3f}  {row['fitted_warm']:20.3f}"
              f"  {row['fitted_story']:6.3f}")
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/token_recycling_profile.py", *sys.argv[1:]])
    payload = {"command": command, "warm_requests": args.warm, "record_tree_nodes": args.tree,
               "prompt_rows": args.prompt_rows, "profile": profile,
               "expected_tokens_per_step": rows, "warm_tokens_per_step": accepted}
    print(f"written {save(args.out, payload)}")


if __name__ == "__main__":
    main()
