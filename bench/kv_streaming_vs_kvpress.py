"""tcompile's kv_streaming vs kvpress's StreamingLLMPress: the same greedy continuation?

Usage: .venv/bin/python bench/kv_streaming_vs_kvpress.py
Reads the prompt and the 24 greedy ids kvpress produced (bench/kvpress_peer.py, saved in
bench/results/kvpress_peer.json: StreamingLLMPress(compression_ratio=0.75, n_sink=4), the whole
prompt compressed once after prefill, the cache growing while decoding) and runs
``kv_streaming{ratio=0.25,sinks=4,decode=grow}`` on the same ids. Writes
bench/results/kv_streaming_vs_kvpress.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import tcompile
from bench_common import save
from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer


def main() -> None:
    peer = json.loads((Path(__file__).parent / "results" / "kvpress_peer.json").read_text())["streaming_ids"]
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    opt = tcompile.optimize(model, passes="kv_streaming{ratio=0.25,sinks=4,decode=grow}")
    ids = torch.tensor([peer["prompt_ids"]])
    out = opt.generate(ids, max_new_tokens=len(peer["generated_ids"]), eos_token_id=[])
    ours = out[0, ids.shape[1]:].tolist()
    same = ours == peer["generated_ids"]
    result = {"kvpress_press": peer["press"], "tcompile_pipeline": opt.pipeline, "prompt_tokens": int(ids.shape[1]),
              "kept_entries": {"kvpress": peer["kv_tokens_per_layer"], "tcompile": opt.last_stats.cache_entries_after_prefill},
              "kvpress_ids": peer["generated_ids"], "tcompile_ids": ours, "identical": same,
              "tcompile_text": tok.decode(ours)}
    print(f"identical: {same}; kept {result['kept_entries']}; tcompile: {result['tcompile_text']!r}")
    print(f"written {save('kv_streaming_vs_kvpress', result)}")


if __name__ == "__main__":
    main()
