"""ONNX Runtime lowering: exported and rewritten HF graphs must run in ORT like in torch.

Tiny random ViT / BERT configs keep each export at a few seconds on two CPU cores.
"""
from __future__ import annotations

import importlib.util
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

from tcompile import _compat  # noqa: E402
from tcompile.errors import ArtifactError, BackendUnavailableError, CaptureError  # noqa: E402
from tcompile.lowering.onnxruntime import OrtModule, lower_onnxruntime  # noqa: E402

ATOL = 1e-4


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg).eval()


def _export_vit(model: torch.nn.Module, batch: int = 2, dynamic: bool = True) -> torch.nn.Module:
    pixels = torch.randn(batch, 3, 32, 32)
    shapes = {"pixel_values": {0: torch.export.Dim("batch")}} if dynamic else None
    return torch.export.export(model, (), {"pixel_values": pixels}, strict=False, dynamic_shapes=shapes).module()


def _bert_inputs(batch: int, seq: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.detach(), b.detach(), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, OrtModule]:
    gm = _export_vit(_vit())
    ort = lower_onnxruntime(gm, (), {"pixel_values": torch.randn(2, 3, 32, 32)}, tmp_path_factory.mktemp("vit"))
    return gm, ort


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, OrtModule]:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(cfg).eval()
    batch = torch.export.Dim("batch")
    example = _bert_inputs(2)
    gm = torch.export.export(
        model, (), example, strict=False,
        dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
    ).module()
    # keyword order differs from the capture on purpose: it must not matter
    ort = lower_onnxruntime(gm, (), dict(reversed(example.items())), tmp_path_factory.mktemp("bert"))
    return gm, ort


@pytest.mark.parametrize("batch", [2, 3])
def test_vit_matches_exported_module(vit: tuple, batch: int) -> None:
    gm, ort = vit
    pixels = torch.randn(batch, 3, 32, 32)
    got, want = ort(pixel_values=pixels), gm(pixel_values=pixels)
    assert type(got) is type(want) is transformers.modeling_outputs.ImageClassifierOutput
    assert list(got.keys()) == ["logits"] and got.logits.shape == (batch, 3)
    assert _close(got.logits, want.logits)
    assert ort.input_names == ["pixel_values"] and ort.output_names == ["logits"]
    assert ort.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch", [2, 3])
def test_bert_matches_exported_module(bert: tuple, batch: int) -> None:
    gm, ort = bert
    inputs = _bert_inputs(batch)
    got, want = ort(**inputs), gm(**inputs)
    assert type(got) is type(want)
    assert list(got.keys()) == ["last_hidden_state", "pooler_output"]
    assert _close(got.last_hidden_state, want.last_hidden_state)
    assert _close(got.pooler_output, want.pooler_output)
    assert ort.output_names == ["last_hidden_state", "pooler_output"]
    # positional in export order and an int32 mask (cast to the int64 the graph declares)
    again = ort(inputs["input_ids"], inputs["attention_mask"].int())
    assert _close(again.pooler_output, want.pooler_output)


def test_bad_inputs_name_the_expected_ones(vit: tuple, bert: tuple) -> None:
    _, ort = vit
    with pytest.raises(CaptureError, match="pixel_values"):
        ort(images=torch.randn(2, 3, 32, 32))
    with pytest.raises(CaptureError, match="missing inputs.*pixel_values"):
        ort()
    with pytest.raises(CaptureError, match=r"shape \(2, 3, 16, 16\)"):
        ort(pixel_values=torch.randn(2, 3, 16, 16))
    with pytest.raises(CaptureError, match="must be torch.int64"):
        bert[1](input_ids=torch.rand(2, 7), attention_mask=torch.ones(2, 7, dtype=torch.long))


def _pick_and_merge(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token rewrite of the kind passes insert: [B, N, C] -> [B, N, C] plus indices.

    Adds the mean of the k highest-norm tokens (topk + gather + scatter_add, the mean as sum /
    count) into even positions, then reorders tokens with step-2 slices and cat.
    """
    score = torch.log(x.norm(dim=-1)[:, 1:] + 1.0)
    idx = score.topk(k, dim=-1).indices + 1
    picked = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    dst = (idx // 2) * 2
    sums = torch.zeros_like(x).scatter_add(1, dst.unsqueeze(-1).expand_as(picked), picked)
    counts = torch.zeros_like(x[..., :1]).scatter_add(1, dst.unsqueeze(-1), torch.ones_like(picked[..., :1]))
    merged = x + sums / (counts + 1.0)
    return torch.cat([merged[:, ::2], merged[:, 1::2]], dim=1), idx


def _rewrite(gm: torch.nn.Module) -> torch.nn.Module:
    """Insert ``_pick_and_merge`` after the embeddings (the first layer_norm's input)."""
    graph = gm.graph
    ln = next(n for n in graph.nodes if n.target is torch.ops.aten.layer_norm.default)
    emb = ln.args[0]
    with graph.inserting_after(emb):
        call = graph.call_function(_pick_and_merge, (emb, 4))
    with graph.inserting_after(call):
        tokens = graph.call_function(operator.getitem, (call, 0))
    emb.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not call)
    graph.lint()
    gm.recompile()
    return gm


def test_rewritten_graph_lowers(tmp_path: Path) -> None:
    """One export covers a rewritten graph, a batch-1 example and external data round trip."""
    model = _vit()
    original = _export_vit(model)
    rewritten = _rewrite(_export_vit(model))
    pixels = torch.randn(1, 3, 32, 32)
    assert not _close(rewritten(pixel_values=pixels).logits, original(pixel_values=pixels).logits)
    ort = lower_onnxruntime(rewritten, (), {"pixel_values": pixels}, tmp_path / "w", external_data=True)
    assert ort.io.export_batch == 2 and ort.io.data_files == ["model.onnx.data"]
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3, 32, 32)
        assert _close(ort(pixel_values=x).logits, rewritten(pixel_values=x).logits)
    assert ort.save(tmp_path / "saved") == ["model.onnx", "model.onnx.data", "onnx_io.json"]
    loaded = OrtModule.load(tmp_path / "saved")
    x = torch.randn(3, 3, 32, 32)
    assert _close(loaded(pixel_values=x).logits, rewritten(pixel_values=x).logits)


def test_save_load_round_trip_in_fresh_process(vit: tuple, tmp_path: Path) -> None:
    gm, ort = vit
    assert ort.save(tmp_path) == ["model.onnx", "onnx_io.json"]
    x = torch.randn(3, 3, 32, 32)
    assert _close(OrtModule.load(tmp_path)(pixel_values=x).logits, gm(pixel_values=x).logits)
    torch.save(x, tmp_path / "x.pt")
    # A fresh interpreter has not registered ModelOutput with pytree until it imports transformers.
    code = (
        "import sys, torch; from tcompile.lowering.onnxruntime import OrtModule; "
        f"d = {str(tmp_path)!r}; out = OrtModule.load(d)(pixel_values=torch.load(d + '/x.pt')); "
        "torch.save(out.logits, d + '/y.pt'); print(type(out).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ImageClassifierOutput"
    assert _close(torch.load(tmp_path / "y.pt"), gm(pixel_values=x).logits)


def test_load_without_io_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no onnx_io.json"):
        OrtModule.load(tmp_path)


def test_static_batch_module(tmp_path: Path) -> None:
    gm = _export_vit(_vit(), dynamic=False)
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(CaptureError, match="dynamic_batch=False"):
        lower_onnxruntime(gm, (), {"pixel_values": pixels}, tmp_path)
    ort = lower_onnxruntime(gm, (), {"pixel_values": pixels}, tmp_path, dynamic_batch=False)
    assert _close(ort(pixel_values=pixels).logits, gm(pixel_values=pixels).logits)
    with pytest.raises(CaptureError, match="shape"):
        ort(pixel_values=torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("module", ["onnxruntime", "onnxscript"])
def test_missing_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tcompile\[onnx\]'") as info:
        lower_onnxruntime(torch.nn.Identity(), (torch.zeros(2),), {}, tmp_path)
    assert module in str(info.value) and isinstance(info.value, ImportError)


def test_treespec_round_trip_keeps_model_output() -> None:
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(
        last_hidden_state=torch.zeros(1), pooler_output=torch.ones(1)
    )
    leaves, spec = _compat.tree_flatten(out)
    loaded = _compat.treespec_loads(_compat.treespec_dumps(spec))
    assert loaded == spec
    assert _compat.leaf_paths(loaded) == ["['last_hidden_state']", "['pooler_output']"]
    assert type(_compat.tree_unflatten(leaves, loaded)) is type(out)
