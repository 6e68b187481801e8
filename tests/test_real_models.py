"""Real models (marker ``slow``; CI runs them): MiniLM under a FLOPs budget, the Fashion-MNIST ViT merged."""
from __future__ import annotations

import pytest
import torch

import tcompile

pytestmark = pytest.mark.slow


def test_minilm_flops_budget_keeps_sentence_embeddings():
    from tcompile.models.data import pydoc_sentences
    from tcompile.models.text import encode, load_minilm, load_minilm_tokenizer, mean_pool
    model, tok = load_minilm(), load_minilm_tokenizer()
    sentences = pydoc_sentences(96)
    calib = [encode(tok, sentences[64 + i:64 + i + 16]) for i in (0, 16)]
    opt = tcompile.optimize(model, budget="flops=0.7", example_inputs=calib[0], calibration=calib, repeats=1)
    assert opt.report.flops["optimized"] / opt.report.flops["baseline"] <= 0.7
    assert opt.pipeline.startswith("token_merging")
    batch = encode(tok, sentences[:64])
    with torch.no_grad():
        ref = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        got = mean_pool(opt(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.nn.functional.cosine_similarity(ref, got).mean() >= 0.98


def test_fashion_vit_merging_keeps_accuracy():
    from tcompile.models.data import fashion_mnist_calibration
    from tcompile.models.fashion_vit import load_fashion_vit
    model = load_fashion_vit()
    images, labels = fashion_mnist_calibration(limit=256)
    opt = tcompile.optimize(model, passes="token_merging{r=8}", example_inputs={"pixel_values": images[:32]},
                            measure=False)
    with torch.no_grad():
        base = (model(pixel_values=images).logits.argmax(-1) == labels).float().mean()
        merged = (opt(pixel_values=images).logits.argmax(-1) == labels).float().mean()
    assert opt.report.tokens_per_layer["optimized"][-1] < 197
    assert merged >= base - 0.03


def test_cli_optimize_writes_artifact_and_report(tmp_path, capsys):
    from tcompile.cli import main
    out = tmp_path / "art"
    assert main(["optimize", "tiny-vit", "--passes", "token_merging{r=4}", "--out", str(out), "--repeats", "1",
                 "-q"]) == 0
    assert (out / "manifest.json").exists() and (out / "report.html").exists()
    assert "token_merging{r=4}" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["optimize", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "cannot find model" in capsys.readouterr().err
