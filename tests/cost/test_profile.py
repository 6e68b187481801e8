"""Device profiles: serialisation, the CPU cache, lookup by name, and a quick real measurement."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch

from tcompile.cost import profile as profile_mod
from tcompile.cost.profile import (
    DATASHEETS,
    DeviceProfile,
    cpu_profile,
    cpu_profile_path,
    get_profile,
    measure_cpu_profile,
)


def fake_profile(name: str = "fake cpu") -> DeviceProfile:
    return DeviceProfile(name=name, kind="cpu", matmul_flops={"float32": 5e10, "bfloat16": 2e10},
                         elementwise_flops=4e9, mem_bandwidth=8e9, op_overhead=6e-6,
                         source="measured", measured_at="2025-01-01T00:00:00+00:00", threads=2,
                         notes="made up")


def test_json_round_trip(tmp_path: Path) -> None:
    prof = fake_profile()
    path = tmp_path / "sub" / "p.json"
    prof.to_json(path)
    assert DeviceProfile.from_json(path) == prof
    assert DeviceProfile.from_dict(prof.to_dict()) == prof
    data = json.loads(path.read_text())
    data["added_by_a_newer_version"] = 1
    assert DeviceProfile.from_dict(data) == prof
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


def test_invalid_rates_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        DeviceProfile(name="x", kind="cpu", matmul_flops={"float32": 0.0}, elementwise_flops=1.0,
                      mem_bandwidth=1.0, op_overhead=0.0, source="measured")
    with pytest.raises(ValueError, match="positive"):
        DeviceProfile(name="x", kind="cpu", matmul_flops={"float32": 1.0}, elementwise_flops=math.nan,
                      mem_bandwidth=1.0, op_overhead=0.0, source="measured")


def test_matmul_rate_falls_back_to_float32() -> None:
    prof = fake_profile()
    assert prof.matmul_rate("bfloat16") == 2e10
    assert prof.matmul_rate("float16") == 5e10
    assert prof.matmul_rate("float64") == 5e10


def test_attention_rates_fall_back_when_not_measured() -> None:
    prof = fake_profile()                       # an older cache file: no attention figures
    assert prof.attention_rate("float32") == prof.sparse_attention_rate("float32") == 5e10
    measured = DeviceProfile.from_dict({**prof.to_dict(), "attention_flops": 3e10, "sparse_attention_flops": 1e10})
    assert measured.attention_rate("float32") == 3e10 and measured.sparse_attention_rate("float32") == 1e10


@pytest.fixture
def counted_measure(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_measure(seconds_budget: float = 4.0) -> DeviceProfile:
        calls.append(1)
        return fake_profile(f"fake #{len(calls)}")

    monkeypatch.setattr(profile_mod, "measure_cpu_profile", fake_measure)
    return calls


def test_cpu_profile_is_cached(tmp_path: Path, counted_measure: list[int]) -> None:
    first = cpu_profile(cache_dir=tmp_path)
    second = cpu_profile(cache_dir=tmp_path)
    assert len(counted_measure) == 1 and first == second
    path = cpu_profile_path(tmp_path)
    assert path.is_file() and f"-{torch.get_num_threads()}t-" in path.name
    refreshed = cpu_profile(refresh=True, cache_dir=tmp_path)
    assert len(counted_measure) == 2 and refreshed.name == "fake #2"
    assert DeviceProfile.from_json(path).name == "fake #2"


def test_corrupt_cache_is_remeasured(tmp_path: Path, counted_measure: list[int]) -> None:
    path = cpu_profile_path(tmp_path)
    path.write_text("{not json")
    assert cpu_profile(cache_dir=tmp_path).name == "fake #1"
    assert len(counted_measure) == 1 and DeviceProfile.from_json(path).name == "fake #1"


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    counted_measure: list[int]) -> None:
    monkeypatch.setenv("TCOMPILE_CACHE_DIR", str(tmp_path / "env"))
    cpu_profile()
    assert cpu_profile_path().parent == tmp_path / "env" and cpu_profile_path().is_file()
    assert get_profile("CPU") == cpu_profile()  # "cpu" goes through the same cache
    assert len(counted_measure) == 1


def test_get_profile_names() -> None:
    for name in ("h100", "h200", "a100", "l4"):
        prof = get_profile(name)
        assert prof is DATASHEETS[name] and prof.source == "datasheet" and prof.kind == "cuda"
        assert prof.matmul_rate("bfloat16") > prof.matmul_rate("float32")
    assert get_profile("H100").mem_bandwidth == 3.35e12
    assert get_profile("h200").mem_bandwidth > get_profile("h100").mem_bandwidth
    custom = fake_profile()
    assert get_profile(custom) is custom


def test_get_profile_unknown_target_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        get_profile("tpu-v9")
    for name in ("cpu", "cuda", "h100", "h200", "a100", "l4"):
        assert name in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_a_gpu_points_to_datasheets() -> None:
    with pytest.raises(ValueError, match="datasheet.*h100"):
        get_profile("cuda")


def test_measure_cpu_profile_small_budget() -> None:
    start = time.perf_counter()
    prof = measure_cpu_profile(seconds_budget=1.0, passes=1)
    assert time.perf_counter() - start < 5.0
    rates = [*prof.matmul_flops.values(), prof.elementwise_flops, prof.mem_bandwidth, prof.op_overhead,
             prof.attention_flops, prof.sparse_attention_flops]
    assert all(r > 0 and math.isfinite(r) for r in rates)
    assert prof.source == "measured" and prof.kind == "cpu" and prof.threads == torch.get_num_threads()
    assert 1e-7 < prof.op_overhead < 1e-2  # microseconds per op (ms when the machine is contended)


def test_measure_cpu_profile_keeps_the_median_pass_per_figure(monkeypatch) -> None:
    """A slow spell during one pass (half the rates, twice the overhead) is dropped per figure, and
    so is an unusually fast pass."""
    from tcompile.cost import profile as profile_mod
    quick = measure_cpu_profile(seconds_budget=1.0, passes=1)
    slow = dataclasses.replace(quick, elementwise_flops=quick.elementwise_flops / 2,
                               op_overhead=quick.op_overhead * 2,
                               matmul_flops={d: f / 2 for d, f in quick.matmul_flops.items()})
    fast = dataclasses.replace(quick, elementwise_flops=quick.elementwise_flops * 2,
                               op_overhead=quick.op_overhead / 2,
                               matmul_flops={d: f * 2 for d, f in quick.matmul_flops.items()})
    passes = iter([slow, fast, quick])   # the median, not the fastest pass, is kept
    monkeypatch.setattr(profile_mod, "_measure_cpu_pass", lambda budget: next(passes))
    best = measure_cpu_profile(seconds_budget=3.0, passes=3)
    assert best.elementwise_flops == quick.elementwise_flops and best.op_overhead == quick.op_overhead
    assert best.matmul_flops == quick.matmul_flops and "median of 3 passes" in best.notes
    with pytest.raises(ValueError, match="passes=0"):
        measure_cpu_profile(passes=0)
