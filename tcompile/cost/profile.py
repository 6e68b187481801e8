"""Device profiles: the handful of rates the cost model turns FLOPs and bytes into seconds.

Why so few numbers: a roofline (compute rate, memory bandwidth) plus a fixed per-op cost ranks
token-reduction rewrites correctly without per-kernel tables. The CPU profile is measured, since
no datasheet describes a shared VM (and eager FX overhead is a property of the host); it is cached
per CPU model and thread count because measuring costs seconds. GPU profiles come from public
datasheets (dense figures, no sparsity), so a plan for a GPU can be made on a machine without one;
on a machine with one, ``get_profile("cuda")`` measures it instead.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from tcompile.cost.flops import SOFTMAX_FLOPS_PER_ELEM
from tcompile.cost.model import measure_latency, measure_op_overhead


@dataclass(frozen=True)
class DeviceProfile:
    """Rates of one device: FLOP/s per matmul dtype, elementwise FLOP/s, bytes/s, s per op."""

    name: str
    kind: str  # "cpu" | "cuda"
    matmul_flops: dict[str, float]  # dtype name ("float32", "bfloat16", ...) -> FLOP/s
    elementwise_flops: float  # FLOP/s of non-matmul math
    mem_bandwidth: float  # bytes/s, read + write
    op_overhead: float  # seconds of fixed cost per executed op (eager FX dispatch)
    source: str  # "measured" | "datasheet"
    measured_at: str = ""  # ISO 8601, for measured profiles
    threads: int | None = None
    notes: str = ""
    # FLOP/s of fused dense attention (SDPA) and of tcompile's sparse prefill attention, when
    # measured; None falls back to the matmul rate (attention) and the attention rate (sparse)
    attention_flops: float | None = None
    sparse_attention_flops: float | None = None
    # bytes/s a matrix-vector product streams its weight at (a decode step's matmuls: one row
    # against a weight far beyond the caches), when measured; None falls back to mem_bandwidth
    matmul_bandwidth: float | None = None

    def runs_here(self) -> bool:
        """Whether this profile was measured on this host as it runs now (its CPU model and
        thread count, or its GPU visible): only then may a node be timed for it (op probes)."""
        if self.source != "measured":
            return False
        if self.kind == "cpu":
            return self.name == cpu_profile_name()
        return torch.cuda.is_available() and self.name == cuda_profile_name(torch.cuda.current_device())

    def weight_bandwidth(self) -> float:
        """Bytes/s of the memory side of a matmul: measured weight streaming, else mem_bandwidth."""
        return self.matmul_bandwidth or self.mem_bandwidth

    def __post_init__(self) -> None:
        rates = [*self.matmul_flops.values(), self.elementwise_flops, self.mem_bandwidth]
        if not self.matmul_flops or not all(r > 0 and math.isfinite(r) for r in rates):
            raise ValueError(f"profile {self.name!r}: every rate must be positive and finite")
        if self.op_overhead < 0:
            raise ValueError(f"profile {self.name!r}: op_overhead must be >= 0")

    def attention_rate(self, dtype: str) -> float:
        """FLOP/s of fused dense attention: measured (SDPA), else the matmul rate."""
        return self.attention_flops or self.matmul_rate(dtype)

    def sparse_attention_rate(self, dtype: str) -> float:
        """FLOP/s of the kept pairs of tcompile's sparse prefill attention: measured, else the
        attention rate."""
        return self.sparse_attention_flops or self.attention_rate(dtype)

    def matmul_rate(self, dtype: str) -> float:
        """FLOP/s of a matmul in ``dtype``; float32's rate when the profile has no figure for it."""
        rate = self.matmul_flops.get(dtype, self.matmul_flops.get("float32"))
        return rate if rate is not None else min(self.matmul_flops.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Keys this version does not know are ignored, so newer cache files still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["matmul_flops"] = {str(k): float(v) for k, v in kwargs["matmul_flops"].items()}
        return cls(**kwargs)

    def to_json(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a reader never sees half a profile."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: str | Path) -> DeviceProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


#: Assumed, as no datasheet states it: eager FX dispatch (~5 us host time) + CUDA launch (~3 us).
ASSUMED_GPU_OP_OVERHEAD = 8e-6


def _datasheet(name: str, fp32: float, tf32: float, half: float, bw: float, cite: str,
               fp8: float | None = None) -> DeviceProfile:
    rates = {"float32": fp32, "tfloat32": tf32, "float16": half, "bfloat16": half}
    if fp8 is not None:
        rates |= {"float8_e4m3fn": fp8, "float8_e5m2": fp8}
    return DeviceProfile(name=name, kind="cuda", matmul_flops=rates, elementwise_flops=fp32,
                         mem_bandwidth=bw, op_overhead=ASSUMED_GPU_OP_OVERHEAD, source="datasheet",
                         notes=f"{cite}; dense (sparsity figures halved); float32 = CUDA-core FP32 "
                               f"(torch's default matmul precision); op_overhead assumed")


#: Version of the measurement method, part of the cache key: a change re-measures old caches.
PROFILE_METHOD = 6
_T = 1e12
DATASHEETS: dict[str, DeviceProfile] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TFLOPS; TF32 989, BF16/FP16 1,979,
    # FP8 3,958 TFLOPS (all "with sparsity", so halved); GPU memory bandwidth 3.35 TB/s.
    "h100": _datasheet("NVIDIA H100 SXM 80GB", 67 * _T, 494.5 * _T, 989.5 * _T, 3.35 * _T,
                       "NVIDIA H100 datasheet (SXM)", fp8=1979 * _T),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: same compute as H100 SXM (FP32 67, TF32 989,
    # BF16/FP16 1,979, FP8 3,958 TFLOPS with sparsity); 141 GB HBM3e at 4.8 TB/s.
    "h200": _datasheet("NVIDIA H200 SXM 141GB", 67 * _T, 494.5 * _T, 989.5 * _T, 4.8 * _T,
                       "NVIDIA H200 datasheet (SXM)", fp8=1979 * _T),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: FP32 19.5 TFLOPS; TF32 156, BF16/FP16
    # 312 TFLOPS (dense; the 312/624 figures are with sparsity); GPU memory bandwidth 2,039 GB/s.
    "a100": _datasheet("NVIDIA A100 SXM 80GB", 19.5 * _T, 156 * _T, 312 * _T, 2.039 * _T,
                       "NVIDIA A100 datasheet (80GB SXM)"),
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TFLOPS; TF32 120, BF16/FP16 242, FP8 485
    # TFLOPS (all "with sparsity", so halved); 24 GB GDDR6 at 300 GB/s.
    "l4": _datasheet("NVIDIA L4 24GB", 30.3 * _T, 60 * _T, 121 * _T, 0.3 * _T,
                     "NVIDIA L4 datasheet", fp8=242.5 * _T),
}
TARGETS = ("cpu", "cuda", *DATASHEETS)


def _best_seconds(fn: Callable[[], Any], seconds: float, repeats: int = 25) -> float:
    """Fastest of the timed runs filling ``seconds`` (at least one), after an untimed warmup
    (first-touch page faults, kernel selection). Fastest, not median: noise only ever adds time,
    and on a shared machine the median swung 6x between minutes (OpenMP regions waiting for a
    descheduled thread) while the fastest run stayed put; a cached profile must not keep a spike."""
    fn()
    return measure_latency(fn, repeats=repeats, warmup=0, max_seconds=seconds)["min"]


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> Callable[[], Any]:
    """``x*y+z`` into a preallocated ``out``: times the math, not the allocator."""
    return lambda: torch.mul(x, y, out=out).add_(z)


def measure_cpu_profile(seconds_budget: float = 9.0, passes: int = 3) -> DeviceProfile:
    """Measure this CPU with torch, at the current thread count, within ``seconds_budget``: the
    median of ``passes`` back-to-back passes per figure (see :func:`_measure_cpu_pass`).

    Why passes: a shared VM has slow spells of seconds. One 4-second pass at 15:34Z on 2026-11-29
    took the elementwise rate at 2.1 GFLOP/s (4.6-4.7 in profiles of 13:53Z), the per-op overhead
    at 24 us (11-18) and weight streaming at 6.5 GB/s (10): the dense SmolLM2 prefill was predicted
    51% slow while the sparse op, timed minutes later, was not, and the ranking broke. Why the
    median and not the fastest pass: a figure is the fastest run within its pass already (that
    drops sub-second spikes); the fastest of three passes priced SmolLM2's weight-bound decode step
    27% under its measured median (15:52Z), the median pass is the machine as it usually runs."""
    if passes < 1:
        raise ValueError(f"passes={passes} must be >= 1")
    runs = [_measure_cpu_pass(seconds_budget / passes) for _ in range(passes)]

    def typical(get: Callable[[DeviceProfile], float | None]) -> float | None:
        values = [v for v in map(get, runs) if v is not None]
        return statistics.median(values) if values else None
    dtypes = {d for r in runs for d in r.matmul_flops}
    overhead = typical(lambda r: r.op_overhead)
    notes = runs[-1].notes + (f"; median of {passes} passes per figure" if passes > 1 else "")
    if overhead > CONTENDED_OVERHEAD:
        notes += "; CONTENDED: other processes held the cores, recalibrate when quiet"
        warnings.warn(f"CPU busy while profiling ({overhead * 1e6:.0f} us per op): figures may "
                      "be far off; run `tcompile calibrate` when the machine is idle", stacklevel=2)
    return dataclasses.replace(
        runs[-1], matmul_flops={d: typical(lambda r: r.matmul_flops.get(d)) for d in dtypes},
        elementwise_flops=typical(lambda r: r.elementwise_flops), mem_bandwidth=typical(lambda r: r.mem_bandwidth),
        op_overhead=overhead, attention_flops=typical(lambda r: r.attention_flops),
        sparse_attention_flops=typical(lambda r: r.sparse_attention_flops),
        matmul_bandwidth=typical(lambda r: r.matmul_bandwidth), notes=notes)


#: Seconds per op above which the profile is flagged contended (~20 us when the machine is quiet:
#: above, parallel regions waited for busy cores).
CONTENDED_OVERHEAD = 1e-4


def _measure_cpu_pass(seconds_budget: float) -> DeviceProfile:
    """One pass over every figure of the CPU profile within ``seconds_budget``.

    First what the model needs: fp32 matmul at a ViT-B shape ([8*197, 768] x [768, 768]), x*y+z
    on 4 MB tensors, a 64 MB copy (read + write bytes), one row against 113 MB of linear weights
    (the bytes/s a decode step's matmuls read weights at: ~9 GB/s here against ~18 for the
    copy, which left SmolLM2's decode step under-predicted by a third), the per-node time of an FX graph of tiny
    transformer ops (measure_op_overhead). Then, while time is left, bf16/fp16 (at full shape if
    a 128^3 probe says it fits, else the probe's rate; unmeasured dtypes fall back to float32)
    and a 1024^3 matmul for the notes. Each figure takes >= 2 runs: a budget below that (~0.8 s
    here) is overrun. A machine busy throughout still yields slow figures: recalibrate when quiet.
    """
    start = time.perf_counter()

    def left(share: float) -> float:  # seconds for the next step: its share, never past the end
        return max(0.0, min(share * seconds_budget, seconds_budget - (time.perf_counter() - start)))

    m, k = 8 * 197, 768
    a, w = torch.randn(m, k), torch.randn(k, k)
    work = 2.0 * m * k * k
    rates = {"float32": work / _best_seconds(lambda: torch.mm(a, w), left(0.25))}
    x, y, z, tmp = (torch.full((1 << 20,), 1.5) for _ in range(4))  # 4 MB each
    elementwise = 2.0 * x.numel() / _best_seconds(_fma(x, y, z, tmp), left(0.1))
    src = torch.ones(16 << 20)  # 64 MB of float32: beyond a last-level cache share
    dst = torch.empty_like(src)
    bandwidth = 2.0 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), left(0.15))
    # One row against 32 distinct nn.Linear weights ([1536, 576], 113 MB in all, each read once
    # per run, beyond the caches): how a decode step streams its weights. One large weight
    # measured ~1.5x faster than that (prefetch-friendly), and repeating one small weight reads
    # it from cache (~4x).
    gemv_ws, gemv_x = [torch.randn(1536, 576) for _ in range(32)], torch.randn(1, 576)

    def gemv() -> None:
        for w in gemv_ws:
            torch.nn.functional.linear(gemv_x, w)
    matmul_bandwidth = sum(w.numel() * 4 for w in gemv_ws) / _best_seconds(gemv, left(0.1))
    del gemv_ws
    overhead = measure_op_overhead("cpu", left(0.1))
    notes = [f"torch {torch.__version__}"]
    for dtype in (torch.bfloat16, torch.float16):
        name, ah, wh, p = str(dtype).removeprefix("torch."), a.to(dtype), w.to(dtype), 128
        if left(0.15) < 0.1:  # a slow (emulated) dtype takes ~20 ms for the probe's 2 runs
            notes.append(f"{name} not measured (budget)")
            continue
        probe = ah[:p, :p].contiguous()
        rate = 2.0 * p**3 / _best_seconds(lambda: torch.mm(probe, probe), left(0.05), 3)
        fast = 3 * work / rate < left(0.1)  # time it at the real shape only if that fits
        rates[name] = work / _best_seconds(lambda: torch.mm(ah, wh), left(0.1)) if fast else rate
        notes.append(f"{name} {'measured' if fast else f'estimated from a {p}^3 probe'}")
    attention, sparse = _attention_rates(overhead, left(0.1), left(0.12))
    sq, sq_work = torch.randn(1024, 1024), 2.0 * 1024**3
    if left(0.1) > 3 * sq_work / rates["float32"]:
        rate = sq_work / _best_seconds(lambda: torch.mm(sq, sq), left(0.1))
        notes.append(f"fp32 1024^3 matmul {rate / 1e9:.1f} GFLOP/s")
    threads = torch.get_num_threads()
    return DeviceProfile(
        name=cpu_profile_name(), kind="cpu", matmul_flops=rates,
        elementwise_flops=elementwise, mem_bandwidth=bandwidth, op_overhead=overhead,
        source="measured", measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        threads=threads, notes="; ".join(notes), attention_flops=attention, sparse_attention_flops=sparse,
        matmul_bandwidth=matmul_bandwidth)


def _attention_rates(overhead: float, dense_s: float, sparse_s: float) -> tuple[float, float]:
    """(dense, sparse) attention FLOP/s at a small LM's prefill shape (9 query heads, 3 KV heads,
    d=64; causal SDPA at 1,024 tokens; ``sparse_attention`` vertical_slash at 2,048 tokens and
    density 0.3). FLOPs counted as the cost rules count them, and the sparse op's dispatch
    overhead (its rule's op count × ``overhead``) taken out, so rule + rate add up to the time."""
    import torch.nn.functional as F

    from tcompile.passes import sparse_attention, sparse_ops
    g = torch.Generator().manual_seed(0)
    h, kv, d = 9, 3, 64
    n = 1024
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for heads in (h, kv, kv))
    dense = h * n * (n + 1) / 2 * (4.0 * d + SOFTMAX_FLOPS_PER_ELEM)
    dense_rate = dense / _best_seconds(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), dense_s, 5)
    n, density = 2048, 0.3
    q, k, v = (torch.randn(heads, n, d, generator=g) for heads in (h, kv, kv))
    flops, ops = sparse_attention.sparse_work("v", density, 64, h, n, d, on_cpu=True)
    seconds = _best_seconds(lambda: sparse_ops.attend(q, k, v, "v", density, 64, 64, 64, 64, d ** -0.5, False,
                                                      tiles=True), sparse_s, 3)
    return dense_rate, flops / max(seconds - ops * overhead, 0.1 * seconds)


def measure_cuda_profile(seconds_budget: float = 4.0, device: int | None = None) -> DeviceProfile:
    """Measure the current (or given) CUDA device with CUDA events, like measure_cpu_profile."""
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    deadline = time.perf_counter() + seconds_budget

    def timed(fn: Callable[[], Any], repeats: int = 20) -> float:  # GPU time, by CUDA events
        fn()
        times: list[float] = []
        while len(times) < repeats and not (times and time.perf_counter() > deadline):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        return min(times)  # the fastest run, as in _best_seconds

    m, k, n = 64 * 197, 768, 3072  # a ViT-B MLP at batch 64
    rates: dict[str, float] = {}
    prior = torch.backends.cuda.matmul.allow_tf32
    try:
        for name in ("float32", "tfloat32", "bfloat16", "float16"):
            torch.backends.cuda.matmul.allow_tf32 = name == "tfloat32"
            dtype = torch.float32 if name == "tfloat32" else getattr(torch, name)
            a, b = (torch.randn(r, c, device=dev, dtype=dtype) for r, c in ((m, k), (k, n)))
            rates[name] = 2.0 * m * k * n / timed(lambda: torch.mm(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prior
    x, y, z, tmp = (torch.rand(1 << 24, device=dev) for _ in range(4))
    elementwise = 2.0 * x.numel() / timed(_fma(x, y, z, tmp))
    src = torch.ones(64 << 20, device=dev)  # 256 MB
    dst = torch.empty_like(src)
    bandwidth = 2.0 * src.numel() * 4 / timed(lambda: dst.copy_(src))
    overhead = measure_op_overhead(dev, max_seconds=0.5)
    return DeviceProfile(
        name=cuda_profile_name(dev), kind="cuda", matmul_flops=rates,
        elementwise_flops=elementwise, mem_bandwidth=bandwidth, op_overhead=overhead,
        source="measured", measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=f"torch {torch.__version__}; matmul [{m}, {k}] x [{k}, {n}]; elementwise from x*y+z "
              "on 64 MB tensors (memory-bound on a GPU)")


def cpu_profile_name() -> str:
    """The name a profile of this CPU at the current torch thread count carries."""
    return f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"


def cuda_profile_name(device: int | torch.device) -> str:
    """The name a measured profile of that GPU carries."""
    return f"cuda: {torch.cuda.get_device_name(device)}"


@functools.cache
def cpu_model() -> str:
    """The CPU's model string (/proc/cpuinfo "model name"), the cache key of its profile."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def resolve_cache_dir(override: Path | str | None = None) -> Path:
    """``override``, else ``$TCOMPILE_CACHE_DIR``, else ``~/.cache/tcompile``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("TCOMPILE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tcompile"


def cpu_profile_path(cache: Path | str | None = None) -> Path:
    """Where this CPU's profile is cached: keyed by CPU model and torch thread count."""
    model, threads = cpu_model(), torch.get_num_threads()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:48] or "cpu"
    digest = hashlib.sha1(f"{model}|{threads}".encode()).hexdigest()[:8]
    name = f"cpu-profile-v{PROFILE_METHOD}-{slug}-{threads}t-{digest}.json"
    return resolve_cache_dir(cache) / name


def cpu_profile(refresh: bool = False, cache_dir: Path | None = None) -> DeviceProfile:
    """This CPU's profile: read from the cache, or measured (and cached) when absent, unreadable,
    or ``refresh`` is set (``tcompile calibrate``). A cache that cannot be written only warns."""
    path = cpu_profile_path(cache_dir)
    if not refresh and path.is_file():
        try:
            return DeviceProfile.from_json(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # corrupt or from an incompatible version: measure again
    profile = measure_cpu_profile()
    try:
        profile.to_json(path)
    except OSError as err:
        warnings.warn(f"could not cache the CPU profile at {path}: {err}", stacklevel=2)
    return profile


_CUDA_PROFILES: dict[int, DeviceProfile] = {}  # measured once per process and device


def get_profile(target: str | DeviceProfile) -> DeviceProfile:
    """A profile by target name: "cpu" (measured, cached), "cuda" (measured once per process on
    this machine's GPU), or a datasheet name (h100, h200, a100, l4); a profile passes through."""
    if isinstance(target, DeviceProfile):
        return target
    key = str(target).strip().lower()
    if key == "cpu":
        return cpu_profile()
    if key == "cuda":
        if not torch.cuda.is_available():
            names = ", ".join(DATASHEETS)
            raise ValueError("target 'cuda' needs a CUDA device and torch sees none; to plan for"
                             f" a GPU from here, name its datasheet profile: {names}")
        index = torch.cuda.current_device()
        if index not in _CUDA_PROFILES:
            _CUDA_PROFILES[index] = measure_cuda_profile(device=index)
        return _CUDA_PROFILES[index]
    if key in DATASHEETS:
        return DATASHEETS[key]
    raise ValueError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
