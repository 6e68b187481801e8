"""Op probes: a node timed on the device, once per shape, only for a profile measured here."""
from __future__ import annotations

import dataclasses
import time

import torch

from tcompile.cost import DATASHEETS, cpu_profile
from tcompile.cost.probe import Probe, TensorSpec, probe_seconds


def test_probe_builds_its_inputs_and_is_timed_once():
    calls: list[tuple[torch.Size, torch.dtype, str]] = []

    def op(x: torch.Tensor, tag: str) -> None:
        calls.append((x.shape, x.dtype, tag))
        time.sleep(0.01)
    probe = Probe(op, (TensorSpec((2, 3), torch.float64), "t"))
    prof = cpu_profile()
    seconds = probe_seconds(probe, prof)
    assert 0.01 <= seconds < 0.5
    assert calls[0] == (torch.Size([2, 3]), torch.float64, "t") and len(calls) >= 2   # warm-up + timed
    count = len(calls)
    assert probe_seconds(probe, prof) == seconds and len(calls) == count            # cached
    assert probe_seconds(Probe(op, (TensorSpec((2, 4)), "t")), prof) > 0 and len(calls) > count


def test_only_a_profile_measured_on_this_host_probes():
    here = cpu_profile()
    assert here.runs_here()
    assert not dataclasses.replace(here, name="cpu: another machine (2 threads)").runs_here()
    assert not dataclasses.replace(here, source="datasheet").runs_here()
    assert not DATASHEETS["h100"].runs_here()
