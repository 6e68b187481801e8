"""Artifacts per backend: round trip, a corrupted engine, a version or device mismatch, the Triton layout.

Every failure must be an ArtifactError that names the problem and the fix, raised before the
engine is opened (never a crash inside onnxruntime or the AOTInductor loader).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import tcompile
from tcompile.errors import ArtifactError, BackendUnavailableError
from tcompile.models.vision import tiny_bert

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ENGINE = {"eager": "program.pt2", "onnxruntime": "model.onnx", "aot": "model.pt2"}


@pytest.fixture(scope="module", params=["eager", "onnxruntime", "aot"])
def exported(request, lowered_vit, tmp_path_factory) -> tuple[object, Path]:
    opt = lowered_vit(request.param)
    return opt, opt.export(tmp_path_factory.mktemp(request.param) / "art")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_and_manifest(exported, x2) -> None:
    opt, path = exported
    m = _manifest(path)
    assert m["backend"] == opt.backend and m["pipeline"] == "token_merging{r=4}"
    assert ENGINE[opt.backend] in m["files"] and all(len(e["sha256"]) == 64 for e in m["files"].values())
    assert m["inputs"]["kwargs"]["pixel_values"]["shape"] == [2, 3, 16, 16]
    assert m["inputs"]["dynamic_ranges"]["batch"] == {"min": 1, "max": 4096}
    assert m["device"]["type"] == "cpu" and m["device"]["arch"]
    assert m["device_bound"] == (opt.backend == "aot")
    assert ("onnxruntime" in m["requires"]) == (opt.backend == "onnxruntime")
    assert ("torch" in m["requires"]) == (opt.backend != "onnxruntime")
    assert m["lowering"]["backend"] == opt.backend and "versions" in m
    assert f"lowering: {opt.backend}: " in opt.report.summary() and "no fallbacks" in opt.report.summary()
    assert "## Lowering" in (path / "report.md").read_text()
    again = tcompile.load(path)
    x3 = {"pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        assert (again(**x3).logits - opt(**x3).logits).abs().max().item() <= 1e-4


def _copy(path, tmp_path):
    """A byte-for-byte copy of the artifact directory ``path``, to tamper with."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return copy


def test_corrupted_engine_is_refused(exported, tmp_path) -> None:
    opt, path = exported
    copy = _copy(path, tmp_path)
    engine = copy / ENGINE[opt.backend]
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{re.escape(engine.name)} was modified after export.*re-export"):
        tcompile.load(copy)
    engine.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(ArtifactError, match="modified after export"):
        tcompile.load(copy)


def test_version_mismatch_is_explained(exported, tmp_path) -> None:
    opt, path = exported
    copy = _copy(path, tmp_path)
    m = _manifest(copy)
    package = "onnxruntime" if opt.backend == "onnxruntime" else "torch"
    m["requires"][package] = ">=99.0" if package == "onnxruntime" else "1.13"
    m["versions"][package] = "99.0.1" if package == "onnxruntime" else "1.13.1"
    _write(copy, m)
    with pytest.raises(ArtifactError, match=rf"version mismatch: this {opt.backend} artifact was written by {package}.*"
                                            rf"pip install '{package}"):
        tcompile.load(copy)


def test_device_mismatch_is_explained(exported, tmp_path) -> None:
    opt, path = exported
    if opt.backend != "aot":
        pytest.skip("only aot (and tensorrt) artifacts hold device-specific machine code")
    copy = _copy(path, tmp_path)
    m = _manifest(copy)
    m["device"]["arch"] = "riscv64"
    _write(copy, m)
    with pytest.raises(ArtifactError, match="machine code for riscv64.*re-export"):
        tcompile.load(copy)
    m["device"] = {"type": "cuda", "arch": m["device"]["arch"], "name": "NVIDIA H100", "capability": "9.0"}
    _write(copy, m)
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="built for a CUDA GPU.*no CUDA device"):
            tcompile.load(copy)


def _parse_pbtxt(text: str) -> dict:
    """A small reader for the protobuf text format Triton uses (enough for config.pbtxt)."""
    tokens = re.findall(r'"[^"]*"|[\[\]{}:,]|[^\s\[\]{}:,"]+', text)
    pos = 0

    def value() -> object:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out[key] = value()
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out
    return message(None)


def test_triton_layout_matches_the_onnx_file(tmp_path) -> None:
    model = tiny_bert(layers=1)
    ids = torch.randint(0, 128, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = tcompile.optimize(model, passes=[], example_inputs=inputs, backend="onnxruntime", measure=False)
    repo = opt.export(tmp_path / "repo", layout="triton-server", name="minibert", max_batch_size=16).parent
    config = _parse_pbtxt((repo / "minibert" / "config.pbtxt").read_text())
    graph = onnx.load(str(repo / "minibert" / "1" / "model.onnx")).graph
    assert config["name"] == "minibert" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16 and "dynamic_batching" in config
    types = {1: "TYPE_FP32", 7: "TYPE_INT64"}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        assert [t["name"] for t in config[kind]] == [v.name for v in values]
        for entry, v in zip(config[kind], values):
            shape = v.type.tensor_type.shape.dim
            assert shape[0].dim_param  # the batch dim is symbolic in the file...
            assert entry["dims"] == [d.dim_value if d.HasField("dim_value") else -1 for d in shape[1:]]  # ...and Triton's
            assert entry["data_type"] == types[v.type.tensor_type.elem_type]
    assert [t["name"] for t in config["input"]] == ["input_ids", "attention_mask"]


def test_triton_layout_refuses_a_backend_without_a_platform(model, x2, tmp_path) -> None:
    opt = tcompile.optimize(model, passes=[], example_inputs=x2, measure=False)
    with pytest.raises(BackendUnavailableError, match="triton-server.*backend 'eager'.*backend='onnxruntime'"):
        opt.export(tmp_path / "repo", layout="triton-server")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ValueError, match="unknown export layout"):
        opt.export(tmp_path / "x", layout="zip")
