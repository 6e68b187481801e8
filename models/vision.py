"""Vision transformers of the zoo: HF ViT-Base/16 (random init, for speed) and a tiny ViT for tests."""
from __future__ import annotations

import torch


def vit_b16(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """ViT-Base/16 at 224x224 (86M parameters, 197 tokens) with random weights: timing needs no training."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, num_labels=1000, attn_implementation=attn_implementation)
    return ViTForImageClassification(cfg).eval()


def tiny_vit(attn_implementation: str = "sdpa", seed: int = 0, image_size: int = 32, patch_size: int = 4,
             layers: int = 4) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, num_hidden_layers=layers,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, attn_implementation=attn_implementation)
    return ViTForImageClassification(cfg).eval()


def tiny_bert(attn_implementation: str = "sdpa", seed: int = 0, layers: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, attn_implementation=attn_implementation)
    return BertModel(cfg).eval()
