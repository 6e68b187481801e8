"""Artifact manifests: a tampered, truncated or incompatible artifact must fail loudly and helpfully."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tcompile import artifact
from tcompile.artifact import MANIFEST, atomic_write_text, read_manifest, versions, write_manifest
from tcompile.errors import ArtifactError

META = {"pipeline": "token_merging{r=4}", "backend": "onnxruntime", "model": "tiny-vit"}


@pytest.fixture
def art(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01onnx-bytes" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    write_manifest(tmp_path, ["model.onnx", "sub/weights.bin"], META)
    return tmp_path


def _edit(directory: Path, **changes: object) -> None:
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_versions_lists_the_stack() -> None:
    found = versions()
    assert {"python", "tcompile", "torch"} <= set(found)
    assert found["torch"] == torch.__version__


def test_write_then_read(art: Path) -> None:
    manifest = read_manifest(art)
    assert manifest["format"] == artifact.FORMAT and manifest["format_version"] == artifact.FORMAT_VERSION
    assert set(manifest["files"]) == {"model.onnx", "sub/weights.bin"}
    assert manifest["files"]["sub/weights.bin"]["bytes"] == 256
    assert manifest["pipeline"] == META["pipeline"] and manifest["model"] == "tiny-vit"
    assert "T" in manifest["created"] and manifest["versions"]["torch"] == torch.__version__
    assert not list(art.glob(".*.tmp"))  # the atomic write left no temporary file


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"not a tcompile artifact: no manifest.json in .*opt.export"):
        read_manifest(tmp_path)


def test_invalid_json(art: Path) -> None:
    (art / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(art)


def test_wrong_format(art: Path) -> None:
    _edit(art, format="something-else")
    with pytest.raises(ArtifactError, match="not a tcompile artifact"):
        read_manifest(art)


def test_newer_format_version(art: Path) -> None:
    _edit(art, format_version=artifact.FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer.*upgrade tcompile"):
        read_manifest(art)


def test_missing_file(art: Path) -> None:
    (art / "sub" / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="sub/weights.bin is listed in manifest.json but missing"):
        read_manifest(art)


def test_tampered_byte(art: Path) -> None:
    data = bytearray((art / "model.onnx").read_bytes())
    data[3] ^= 0xFF
    (art / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx was modified after export: sha256 expected .* found .*re-export"):
        read_manifest(art)
    assert read_manifest(art, verify=False)["files"]  # verify=False skips the checksums


def test_torch_version_mismatch(art: Path) -> None:
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["versions"]["torch"] = "1.13.1"
    _edit(art, versions=manifest["versions"])
    read_manifest(art)  # no torch-serialized programs: the version does not matter
    _edit(art, requires_torch_match=True)
    with pytest.raises(ArtifactError, match=rf"torch 1\.13\.1.*{re.escape(torch.__version__)}.*re-export"):
        read_manifest(art)


def test_torch_patch_version_is_compatible(tmp_path: Path) -> None:
    (tmp_path / "prog.pt2").write_bytes(b"x")
    write_manifest(tmp_path, ["prog.pt2"], {"requires_torch_match": True})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    major_minor = ".".join(torch.__version__.split(".")[:2])
    manifest["versions"]["torch"] = f"{major_minor}.99"
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(tmp_path)["requires_torch_match"] is True


def test_write_rejects_bad_entries(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        write_manifest(tmp_path, ["absent.bin"], {})
    with pytest.raises(ArtifactError, match="inside"):
        write_manifest(tmp_path, ["../escape.bin"], {})
    (tmp_path / "a.bin").write_bytes(b"a")
    with pytest.raises(ArtifactError, match="reserved"):
        write_manifest(tmp_path, ["a.bin"], {"files": {}})


def test_atomic_write_text_replaces(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "f.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
