"""Merged text encoders with padding: engines agree with eager on every real token.

Which padding tokens merge first is a tie (all pads share one priority); torch's argsort and
ONNX's TopK break it differently, so only the padding positions' outputs (which carry no
meaning: pooling drops them) may differ. Real tokens must match within 1e-4.
"""
from __future__ import annotations

import pytest
import torch

import tcompile
from tcompile.models.vision import tiny_bert

pytest.importorskip("onnxruntime")


def test_onnxruntime_matches_eager_on_real_tokens_of_padded_rows() -> None:
    model = tiny_bert(layers=2)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, 24, dtype=torch.long)
    mask[1, 14:] = 0
    mask[3, 20:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    pipe = "token_merging{layers=[5,4],metric=hidden}"
    eager = tcompile.optimize(model, passes=pipe, example_inputs=x, measure=False)
    ort = tcompile.optimize(model, passes=pipe, example_inputs=x, backend="onnxruntime", measure=False)
    with torch.no_grad():
        diff = (eager(**x).last_hidden_state - ort(**x).last_hidden_state).abs()
    assert (diff * mask[:, :, None]).max().item() <= 1e-4
