"""One command for a CUDA machine: check every Triton kernel against its reference, then time it.

    python bench/gpu_check.py            # writes bench/results/gpu_check.md and .json

1. Correctness: each kernel (block-sparse attention, vertical-slash attention, ToMe matching) on
   fresh random inputs in fp16 and bf16, against its dense PyTorch reference.
2. Speed: batch 1, SmolLM2-like heads (Hq=9, Hkv=3, d=64), N in {8k, 32k, 128k}, densities
   {5, 10, 30, 50}%: median of >= 20 CUDA-event timings of the op against dense causal SDPA on
   the flash backend. At these sizes the dense reference does not fit, so "max error" is measured
   on 64 sampled query rows against an exact fp32 computation of those rows.

Sized to finish in under 5 minutes on an H200; a time guard skips what is left after 4 minutes.
Runs from the source tree (torch + triton only; tcompile need not be installed). Without a CUDA
device it prints "no CUDA device: nothing to check" and exits 0.

Papers: MInference 1.0 (NeurIPS 2024) for the sparse patterns, FlashAttention-2 for the kernel
structure, ToMe (ICLR 2023) for the matching.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
SIZES = (8192, 32768, 131072)
TOME_SIZES = (1024, 4096, 16384)
DENSITIES = (0.05, 0.10, 0.30, 0.50)
HQ, HKV, D, BLOCK = 9, 3, 64, 64
RUNS, WARMUP = 20, 3
GUARD_S = 240.0
DEVICE = "cuda"  # module-level so the helpers can be dry-run on CPU
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def load_kernels() -> dict[str, types.ModuleType]:
    """Import kernels/ as tcompile.kernels straight from this tree, without running
    tcompile/__init__.py or passes/__init__.py (they pull in transformers and the pass registry)."""
    for name, folder in (("tcompile", "tcompile"), ("tcompile.passes", "passes")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(ROOT / folder)]
            sys.modules[name] = mod
    if "tcompile.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tcompile.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tcompile.kernels"] = mod
        spec.loader.exec_module(mod)
    import tcompile.kernels.block_sparse_attention as bsa
    import tcompile.kernels.token_merge as tm
    import tcompile.kernels.vertical_slash as vs
    return {"bsa": bsa, "vs": vs, "tm": tm}


# ----------------------------------------------------------------------------- inputs
def qkv(n: int, dtype: torch.dtype, gen: torch.Generator, hq: int = HQ, hkv: int = HKV,
        d: int = D) -> tuple[torch.Tensor, ...]:
    mk = lambda h: torch.randn(1, h, n, d, device=DEVICE, dtype=dtype, generator=gen)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def block_lists(n: int, density: float, gen: torch.Generator, hq: int = HQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal random lists: query block m keeps max(1, round(density*(m+1))) of its m+1 key blocks,
    the diagonal one always included."""
    m = -(-n // BLOCK)
    rows = torch.arange(m, device=DEVICE)
    score = torch.rand(1, hq, m, m, device=DEVICE, generator=gen)
    score = score.masked_fill(rows.view(-1, 1) < rows.view(1, -1), -1.0)
    score[..., rows, rows] = 2.0
    count = torch.clamp(torch.round(density * (rows + 1).float()), min=1).to(torch.int32).expand(1, hq, m)
    t = int(count.max())
    index = score.topk(t, dim=-1).indices.to(torch.int32)
    return index.contiguous(), count.contiguous()


def vs_pattern(n: int, density: float, gen: torch.Generator, hq: int = HQ) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference-like: columns 0..29 + random columns, offsets 0..99 (local band) + random offsets;
    about density*N/2 of each, which keeps roughly ``density`` of the causal pairs."""
    k = max(128, int(density * n / 2))
    vert = torch.randint(0, n, (1, hq, k), device=DEVICE, generator=gen, dtype=torch.int32)
    vert[..., :30] = torch.arange(30, device=DEVICE, dtype=torch.int32)
    slash = torch.randint(0, n, (1, hq, k), device=DEVICE, generator=gen, dtype=torch.int32)
    slash[..., :100] = torch.arange(100, device=DEVICE, dtype=torch.int32)
    return vert, slash


# ----------------------------------------------------------------------------- measuring
def cuda_ms(fn: Callable[[], Any], runs: int = RUNS) -> float:
    """Median milliseconds over ``runs`` CUDA-event timings, after warm-up."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Causal SDPA on the flash backend (GQA through enable_gqa, else K/V repeated beforehand)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    f = torch.nn.functional.scaled_dot_product_attention

    def run_gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return f(q, k, v, is_causal=True, enable_gqa=True)
    try:
        run_gqa()
        return run_gqa
    except (RuntimeError, TypeError):
        kr, vr = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)

        def run() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return f(q, kr, vr, is_causal=True)
        return run


def sampled_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  row_mask: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator) -> float:
    """Relative max error on 64 random query rows against an exact fp32 computation of them.

    ``row_mask(rows)`` gives the [H, len(rows), Nk] boolean mask of those rows.
    """
    n = q.shape[2]
    rows = torch.randint(0, n, (64,), device=DEVICE, generator=gen)
    rows[0] = n - 1
    rep = q.shape[1] // k.shape[1]
    kf, vf = k[0].float().repeat_interleave(rep, 0), v[0].float().repeat_interleave(rep, 0)
    s = (q[0, :, rows].float() @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = row_mask(rows)
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vf
    got = out[0, :, rows].float()
    return float((got - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------- checks
def check_correctness(km: dict[str, types.ModuleType], gen: torch.Generator) -> list[dict[str, Any]]:
    """Every kernel vs its dense reference, fp16 and bf16, ragged length, GQA 3."""
    bsa, vs, tm = km["bsa"], km["vs"], km["tm"]
    rows = []
    n = 1000
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = qkv(n, dtype, gen)
        scale = 1 / math.sqrt(D)
        idx, cnt = block_lists(n, 0.3, gen)
        out = bsa.block_sparse_attention(q, k, v, idx, cnt, BLOCK, scale, True)
        ref = bsa.block_sparse_attention_reference(q, k, v, idx, cnt, BLOCK, scale, True)
        rows.append(("block_sparse_attention", dtype, out, ref))
        vert, slash = vs_pattern(n, 0.3, gen)
        out = vs.vertical_slash_attention(q, k, v, vert, slash, BLOCK, scale)
        ref = vs.vertical_slash_reference(q, k, v, vert, slash, BLOCK, scale)
        rows.append(("vertical_slash_attention", dtype, out, ref))
        out = vs.vertical_slash_attention(q, k, v, vert, slash, BLOCK, scale, True)
        ref = vs.vertical_slash_reference(q, k, v, vert, slash, BLOCK, scale, True)
        rows.append(("vertical_slash_attention(tiles)", dtype, out, ref))
        a = torch.nn.functional.normalize(torch.randn(4, 577, 64, device=DEVICE, generator=gen), dim=-1).to(dtype)
        b = torch.nn.functional.normalize(torch.randn(4, 576, 64, device=DEVICE, generator=gen), dim=-1).to(dtype)
        pad = torch.zeros(4, 576, dtype=torch.bool, device=DEVICE)
        pad[1, -50:] = True
        score, index = tm.tome_match(a, b, pad, -1e4)
        exact = (a.float() @ b.float().transpose(-1, -2)).masked_fill(pad.unsqueeze(1), -1e4)
        picked = exact.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        rows.append(("tome_match", dtype, torch.stack([score, picked]), exact.max(-1).values.expand(2, -1, -1)))
    result = []
    for name, dtype, out, ref in rows:
        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        result.append({"kernel": name, "dtype": str(dtype).replace("torch.", ""), "max_error": err,
                       "ok": err <= TOL[dtype]})
    return result


def time_rows(km: dict[str, types.ModuleType], gen: torch.Generator, t0: float) -> list[dict[str, Any]]:
    """Sparse kernels vs dense flash SDPA, bf16, at each size and density."""
    bsa, vs = km["bsa"], km["vs"]
    rows: list[dict[str, Any]] = []
    scale = 1 / math.sqrt(D)
    for n in SIZES:
        free = torch.cuda.mem_get_info()[0]
        plan_bytes = HQ * (-(-n // BLOCK)) * (max(DENSITIES) * n / 2) * 40  # VS index plan at the top density
        if plan_bytes + 24 * HQ * n * D > 0.8 * free:
            rows.append({"kernel": "*", "N": n, "status": "skipped: would not fit in GPU memory"})
            continue
        q, k, v = qkv(n, torch.bfloat16, gen)
        if time.monotonic() - t0 > GUARD_S:
            rows.append({"kernel": "*", "N": n, "status": "skipped: time guard"})
            continue
        dense_ms = cuda_ms(dense_sdpa(q, k, v))
        for density in DENSITIES:
            for name in ("block_sparse_attention", "vertical_slash_attention"):
                if time.monotonic() - t0 > GUARD_S:
                    rows.append({"kernel": name, "N": n, "density": density, "status": "skipped: time guard"})
                    continue
                if name == "block_sparse_attention":
                    idx, cnt = block_lists(n, density, gen)
                    fn = lambda: bsa.block_sparse_attention(q, k, v, idx, cnt, BLOCK, scale, True)  # noqa: E731

                    def row_mask(r: torch.Tensor) -> torch.Tensor:
                        blocks = torch.zeros(HQ, len(r), -(-n // BLOCK) + 1, dtype=torch.bool, device=DEVICE)
                        ix, c = idx[0][:, r // BLOCK].long(), cnt[0][:, r // BLOCK].long()
                        used = torch.arange(ix.shape[-1], device=DEVICE) < c.unsqueeze(-1)
                        ix = torch.where(used, ix, blocks.shape[-1] - 1)
                        blocks.scatter_(-1, ix, True)
                        keys = torch.arange(n, device=DEVICE)
                        return blocks[..., keys // BLOCK] & (keys <= r.view(-1, 1))
                else:
                    vert, slash = vs_pattern(n, density, gen)
                    fn = lambda: vs.vertical_slash_attention(q, k, v, vert, slash, BLOCK, scale)  # noqa: E731

                    def row_mask(r: torch.Tensor) -> torch.Tensor:
                        keys = torch.arange(n, device=DEVICE)
                        cols = vs._lut(vert, n)[0].bool()
                        diag = vs._lut(slash, n)[0].bool()
                        off = r.view(-1, 1) - keys
                        return (off >= 0) & (cols.unsqueeze(1) | diag[:, off.clamp(min=0)])
                out = fn()
                err = sampled_error(q, k, v, out, row_mask, gen)
                ms = cuda_ms(fn)
                rows.append({"kernel": name, "N": n, "density": density, "max_error": err, "ms_kernel": ms,
                             "ms_dense": dense_ms, "speedup": dense_ms / ms})
                del out
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def time_tome(km: dict[str, types.ModuleType], gen: torch.Generator, t0: float) -> list[dict[str, Any]]:
    """tome_match vs the PyTorch matmul + masked_fill + max it replaces (batch 8, C=64, fp16)."""
    tm = km["tm"]
    rows = []
    for n in TOME_SIZES:
        if time.monotonic() - t0 > GUARD_S:
            rows.append({"kernel": "tome_match", "N": n, "status": "skipped: time guard"})
            continue
        a = torch.nn.functional.normalize(torch.randn(8, n // 2, 64, device=DEVICE, generator=gen), dim=-1).half()
        b = torch.nn.functional.normalize(torch.randn(8, n // 2, 64, device=DEVICE, generator=gen), dim=-1).half()
        pad = torch.zeros(8, n // 2, dtype=torch.bool, device=DEVICE)
        score, index = tm.tome_match(a, b, pad, -1e4)
        ref = tm.tome_match_reference(a, b, pad, -1e4)[0]
        err = float((score - ref).abs().max())
        ms = cuda_ms(lambda: tm.tome_match(a, b, pad, -1e4))
        dense = cuda_ms(lambda: tm.tome_match_reference(a, b, pad, -1e4))
        rows.append({"kernel": "tome_match", "N": n, "density": None, "max_error": err, "ms_kernel": ms,
                     "ms_dense": dense, "speedup": dense / ms})
    return rows


def check_tensorrt() -> dict[str, Any]:
    """Build the TensorRT engine of a merged ViT (ViT-B/16 config, batch 8, token_merging{r=16},
    fp16) through tcompile's ``tensorrt`` backend, compare it with the eager rewritten graph, time
    both, export the artifact and reload it, and write the Triton layout (tensorrt_plan).

    The graph TensorRT gets is the one the ONNX Runtime backend validates on CPU. Needs tcompile
    importable (``pip install --no-deps --no-build-isolation -e .``), transformers, torch-tensorrt.
    """
    try:
        import tensorrt  # noqa: F401
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return {"kernel": "tensorrt", "status": "not installed (pip install 'tcompile[tensorrt]')"}
    try:
        import tempfile

        import tcompile
        from tcompile.models.vision import vit_b16
    except ImportError as exc:
        return {"kernel": "tensorrt", "status": f"tcompile not importable ({exc}): pip install --no-deps -e ."}
    x = {"pixel_values": torch.randn(8, 3, 224, 224)}
    model = vit_b16()
    try:
        eager = tcompile.optimize(model, passes="token_merging{r=16}", example_inputs=x, measure=False)
        trt = tcompile.optimize(model, passes="token_merging{r=16}", example_inputs=x, backend="tensorrt",
                                measure=False)
        xc = {k: v.cuda() for k, v in x.items()}
        got = trt(**xc).logits.float().cpu()
        err = (got - eager(**x).logits).abs().max().item()
        eager_cuda = tcompile.optimize(model.cuda(), passes="token_merging{r=16}", example_inputs=xc, measure=False)
        ms_trt, ms_eager = cuda_ms(lambda: trt(**xc)), cuda_ms(lambda: eager_cuda(**xc))
        with tempfile.TemporaryDirectory() as tmp:
            again = tcompile.load(trt.export(f"{tmp}/art"))
            reload_err = (again(**xc).logits.float().cpu() - got).abs().max().item()
            layout = "written"
            try:
                trt.export(f"{tmp}/repo", layout="triton-server")
            except Exception as exc:  # e.g. fallback partitions: no single plan
                layout = f"not written: {exc}"
    except Exception as exc:
        return {"kernel": "tensorrt", "status": f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"}
    return {"kernel": "tensorrt merged ViT-B/16 fp16 (vs eager cuda fp32)", "N": 8, "density": None,
            "max_error": err, "ms_kernel": ms_trt, "ms_dense": ms_eager, "speedup": ms_eager / ms_trt,
            "reload_max_error": reload_err, "fallbacks": trt.report.lowering.get("fallbacks"),
            "triton_layout": layout}


# ----------------------------------------------------------------------------- report
def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def to_markdown(meta: dict[str, Any], checks: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [f"# GPU kernel check — {meta['date']}", "",
             f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · python {meta['python']} · "
             f"{meta['wall_s']:.0f} s", "", "## Correctness (vs dense reference, N=1000, Hq=9, Hkv=3, d=64)", "",
             "| kernel | dtype | max error (rel) | ok |", "|---|---|---|---|"]
    lines += [f"| {c['kernel']} | {c['dtype']} | {c['max_error']:.2e} | {'yes' if c['ok'] else 'NO'} |" for c in checks]
    lines += ["", "## Speed (bf16, batch 1, Hq=9, Hkv=3, d=64, block 64; dense = causal SDPA, flash backend; "
              "medians of 20 CUDA-event runs; vertical-slash time includes its index plan; error on 64 sampled "
              "rows)", "", "| kernel | N | density | max error | ms kernel | ms dense | speedup |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "status" in r:
            density = _fmt(r.get("density"), ".0%")
            lines.append(f"| {r['kernel']} | {r.get('N', '')} | {density} | {r['status']} | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['N']} | {_fmt(r['density'], '.0%') or '-'} | {r['max_error']:.1e} | "
                         f"{r['ms_kernel']:.3f} | {r['ms_dense']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    try:
        import triton
    except ImportError:
        print("triton is not installed: pip install 'triton>=3.0', then run again")
        return 1
    t0 = time.monotonic()
    km = load_kernels()
    gen = torch.Generator(device=DEVICE).manual_seed(int(time.time()))  # fresh inputs each run
    checks = check_correctness(km, gen)
    for c in checks:
        verdict = "ok" if c["ok"] else "FAIL"
        print(f"check {c['kernel']:<26} {c['dtype']:<9} max rel error {c['max_error']:.2e} {verdict}")
    rows = time_rows(km, gen, t0) + time_tome(km, gen, t0) + [check_tensorrt()]
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
            "wall_s": time.monotonic() - t0}
    md = to_markdown(meta, checks, rows)
    print(md)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.md").write_text(md)
    (OUT / "gpu_check.json").write_text(json.dumps({**meta, "checks": checks, "rows": rows}, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
