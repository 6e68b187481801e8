"""Causal-LM artifacts: export, load without the model, same tokens; damaged artifacts are refused."""
from __future__ import annotations

import json

import pytest
import torch

import tcompile
from tcompile.errors import ArtifactError


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory):
    opt = tcompile.optimize(llama, passes="kv_h2o{tokens=8}")
    path = opt.export(tmp_path_factory.mktemp("lm") / "artifact")
    return opt, path


def test_export_load_generates_the_same_tokens(exported, prompts):
    opt, path = exported
    ids, mask = prompts
    loaded = tcompile.load(path)
    assert type(loaded).__name__ == "OptimizedLM" and loaded.pipeline == opt.pipeline
    want = opt.generate(ids, mask, max_new_tokens=12)
    got = loaded.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, want)
    assert loaded.last_stats.peak_cache_entries == 8          # the KV policy came back with the programs
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "causal_lm" and "lm_programs.pt2" in manifest["files"]


def test_damaged_lm_artifact_is_refused(exported, tmp_path):
    import shutil
    _, path = exported
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    with open(copy / "lm_programs.pt2", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ArtifactError, match="checksum|sha256|changed"):
        tcompile.load(copy)


def test_export_refuses_a_foreign_directory(exported, tmp_path):
    opt, _ = exported
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a tcompile artifact"):
        opt.export(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("passes", ["speculative{k=4}", "kv_h2o{tokens=8},speculative{drafter=token_recycling}"])
def test_speculative_plans_export_and_decode_the_same_tokens(llama, prompts, tmp_path, passes):
    """The planner may choose speculative decoding: its verify program and (model-free) drafter
    come back from the artifact, and the loaded runtime decodes greedily token for token alike."""
    ids, mask = prompts
    opt = tcompile.optimize(llama, passes=passes)
    path = opt.export(tmp_path / "spec")
    loaded = tcompile.load(path)
    assert hasattr(loaded.runtime, "verify_fn") and loaded.pipeline == opt.pipeline
    want = opt.generate(ids, mask, max_new_tokens=12)
    got = loaded.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, want)
    assert loaded.last_stats.steps > 0
    assert "mean accepted length" in loaded.report.summary()     # the loop's figures reach the report


def test_a_model_drafter_is_not_exported(llama, tmp_path):
    opt = tcompile.optimize(llama, passes=[tcompile.PassSpec.make("speculative", drafter="draft_model", draft=llama)])
    with pytest.raises(ArtifactError, match="model-free drafter"):
        opt.export(tmp_path / "draft")
    assert not (tmp_path / "draft").exists()
