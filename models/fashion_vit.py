"""A small real ViT trained here on Fashion-MNIST (56x56 input, 197 tokens).

Why: no ViT weights ship offline, and token-merging passes (ToMe) must be measured on a model
whose accuracy means something. This model is trained from scratch by
``python -m tcompile.models.train_fashion_vit`` on the 2-core build machines; its weights and a
JSON record of how they were made (test accuracy, command, versions) are committed under
``weights/``. Patch size 4 on 56x56 gives a 14x14 grid: 196 patch tokens plus CLS.
"""
from __future__ import annotations

from pathlib import Path

import transformers

from tcompile.errors import ModelNotFoundError
from tcompile.models.data import FASHION_MNIST_CLASSES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FASHION_VIT_WEIGHTS = WEIGHTS_DIR / "fashion_vit.safetensors"
FASHION_VIT_RECORD = WEIGHTS_DIR / "fashion_vit.json"

IMAGE_SIZE = 56
PATCH_SIZE = 4


def fashion_vit_config() -> transformers.ViTConfig:
    """The architecture of the committed Fashion-MNIST ViT (changing it invalidates the weights)."""
    # Width and depth are sized so that training fits ~30 minutes on one CPU thread.
    return transformers.ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
        hidden_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=192,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label={i: name for i, name in enumerate(FASHION_MNIST_CLASSES)},
        label2id={name: i for i, name in enumerate(FASHION_MNIST_CLASSES)},
        attn_implementation="sdpa",
    )


def load_fashion_vit() -> transformers.ViTForImageClassification:
    """Build the model from :func:`fashion_vit_config` and load the committed fp32 weights (eval mode).

    Raises :class:`ModelNotFoundError` if the weights file is missing.
    """
    from safetensors.torch import load_file

    path = Path(FASHION_VIT_WEIGHTS)  # read at call time so tests can point it elsewhere
    if not path.is_file():
        raise ModelNotFoundError(
            f"Fashion-MNIST ViT weights not found at {path}. They are committed with tcompile; "
            "restore them from git, or retrain with `python -m tcompile.models.train_fashion_vit` "
            "(needs `apt-get install dataset-fashion-mnist`)."
        )
    model = transformers.ViTForImageClassification(fashion_vit_config())
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
