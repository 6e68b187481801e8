"""The model zoo by name: real small models that ship offline, and tiny configs for tests.

``tcompile.models.load(name)`` returns the model with example and calibration inputs; the CLI's
``tcompile optimize NAME`` uses it. A real model whose package is missing raises
:class:`ModelNotFoundError` with the pip command that fixes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tcompile.errors import ModelNotFoundError


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    example_inputs: Any
    calibration: list[Any] = field(default_factory=list)
    description: str = ""
    tokenizer: Any = None


def _minilm(batch: int) -> ZooModel:
    from tcompile.models.data import pydoc_sentences
    from tcompile.models.text import encode, load_minilm, load_minilm_tokenizer
    model, tok = load_minilm(), load_minilm_tokenizer()
    sentences = pydoc_sentences(64)
    batches = [encode(tok, sentences[i:i + 16]) for i in range(0, 64, 16)]
    return ZooModel("minilm", model, encode(tok, sentences[:batch]), batches,
                    "all-MiniLM-L6-v2 (real weights), 64 tokens per sentence, mean pooling")


def _fashion_vit(batch: int) -> ZooModel:
    from tcompile.models.data import fashion_mnist_calibration
    from tcompile.models.fashion_vit import load_fashion_vit
    images, _ = fashion_mnist_calibration(limit=256)
    return ZooModel("fashion-vit", load_fashion_vit(), {"pixel_values": images[:batch]},
                    [{"pixel_values": images[i:i + 64]} for i in range(0, 256, 64)],
                    "ViT trained here on Fashion-MNIST at 56x56 (197 tokens)")


def _vit_b16(batch: int) -> ZooModel:
    from tcompile.models.vision import vit_b16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    return ZooModel("vit-b16", vit_b16(), {"pixel_values": x}, [{"pixel_values": x}],
                    "HF ViT-Base/16 config, random init (for speed)")


def _tiny_vit(batch: int) -> ZooModel:
    from tcompile.models.vision import tiny_vit
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ZooModel("tiny-vit", tiny_vit(), {"pixel_values": x}, [{"pixel_values": x}], "tiny random ViT (tests)")


def _tiny_bert(batch: int) -> ZooModel:
    from tcompile.models.vision import tiny_bert
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (batch, 32), generator=gen)
    mask = torch.ones(batch, 32, dtype=torch.long)
    mask[batch // 2:, 20:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    return ZooModel("tiny-bert", tiny_bert(), inputs, [inputs], "tiny random BERT with padding (tests)")


def _smollm2(batch: int) -> ZooModel:
    from tcompile.models.data import pydoc_sentences
    from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
    from tcompile.models.needle import needle_prompt_ids
    model, tok = load_smollm2(), load_smollm2_tokenizer()
    text = " ".join(pydoc_sentences(400))
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    calibration = [ids[i:i + 512].unsqueeze(0) for i in range(0, 1024, 512)]   # 2 passages: the demo plans in ~1 min
    prompt = torch.tensor([needle_prompt_ids(tok, 1024, 0.5, 73914)])   # a ~1k-token needle question
    return ZooModel("smollm2", model, {"input_ids": prompt}, calibration,
                    "SmolLM2-135M-Instruct (real weights, from the offline GGUF package), causal LM; example: "
                    "a needle-in-a-haystack question over ~1k tokens of pydoc", tokenizer=tok)


def _tiny_llama(batch: int) -> ZooModel:
    from tcompile.models.lm import tiny_llama
    ids = torch.randint(0, 128, (batch, 32), generator=torch.Generator().manual_seed(0))
    text = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))   # 64 prompt + 32 teacher-forced
    return ZooModel("tiny-llama", tiny_llama(), {"input_ids": ids}, [text],
                    "tiny random Llama with GQA (tests)")


ZOO: dict[str, Callable[[int], ZooModel]] = {
    "minilm": _minilm, "smollm2": _smollm2, "tiny-llama": _tiny_llama, "fashion-vit": _fashion_vit, "vit-b16": _vit_b16, "tiny-vit": _tiny_vit,
    "tiny-bert": _tiny_bert,
}


def names() -> list[str]:
    return sorted(ZOO)


def load(name: str, batch: int = 8) -> ZooModel:
    """The zoo model ``name`` with example inputs of ``batch`` rows and calibration batches."""
    if name not in ZOO:
        raise ModelNotFoundError(f"unknown zoo model {name!r}; available: {', '.join(names())}")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    return ZOO[name](batch)
