"""Tests for tcompile.report: round trips, saving, loading and the three renderings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tcompile.report import CandidateRecord, PassRecord, Report
from tcompile.report.html import nice_ticks, pareto_front, render_html
from tcompile.report.markdown import render_markdown

BASE = [197] * 12
OPT = [197, 197, 189, 181, 173, 165, 157, 149, 141, 133, 125, 117]


def filled(**over: object) -> Report:
    """A report with every section filled, as a planner + measured compile would produce."""
    kw: dict = dict(
        model="vit_small", pipeline="dedupe_qkv | token_merging{r=8,method=tome}",
        budget={"max_latency_ratio": 0.7, "min_fidelity": 0.99},
        passes=[
            PassRecord("dedupe_qkv", "dedupe_qkv", "applied", exact=True, seconds=0.004,
                       stats={"sites": 12}, tokens_before=BASE, tokens_after=BASE,
                       flops_before=9.2e9, flops_after=9.2e9, max_abs_error=3e-7),
            PassRecord("token_merging", "token_merging{r=8,method=tome}", "applied",
                       seconds=0.031, stats={"sites": 12, "tokens_removed": 96},
                       tokens_before=BASE, tokens_after=OPT, flops_before=9.2e9,
                       flops_after=6.9e9, fidelity=0.9931),
            PassRecord("kv_evict", "kv_evict{keep=0.5}", "skipped",
                       reason="encoder-only model: no KV cache"),
        ],
        tokens_per_layer={"baseline": BASE, "optimized": OPT},
        flops={"baseline": 9.2e9, "optimized": 6.9e9},
        latency={"predicted": {"baseline": 0.0121, "optimized": 0.0088},
                 "measured": {"baseline": 0.0134, "optimized": 0.0097, "repeats": 50, "batch": 8},
                 "parts": [{"part": "encoder.layer.0", "predicted_s": 0.0007, "measured_s": 0.0008},
                           {"part": "other", "predicted_s": 0.0001, "measured_s": 0.0002}]},
        fidelity={"metric": "cosine", "value": 0.9931, "n": 200},
        output_mode="unmerge: per-token outputs restored to original positions",
        candidates=[
            CandidateRecord("token_merging{r=4}", 0.86, 0.88, 0.90, 0.998, note="too slow"),
            CandidateRecord("dedupe_qkv | token_merging{r=8,method=tome}", 0.75, 0.73, 0.724,
                            0.9931, chosen=True, note="fastest within budget"),
            CandidateRecord("token_merging{r=16}", 0.55, 0.60, 0.62, 0.981, note="fidelity < 0.99"),
            CandidateRecord("token_pruning{keep=0.7}", 0.70, 0.74, 0.78, 0.985, note="dominated"),
        ],
        device={"name": "xeon-16c", "matmul_gflops": 1450.0, "bandwidth_gbs": 180.0},
        versions={"tcompile": "0.1.0", "torch": "2.13.0"},
        op_profile=[{"op": "aten::addmm", "calls": 48, "self_ms": 7.1, "share": 0.61},
                    {"op": "aten::_softmax", "calls": 12, "self_ms": 1.2, "share": 0.10}],
        notes=["measured on batch 8"],
        created="2025-01-01T00:00:00+00:00",
    )
    kw.update(over)
    return Report(**kw)


def test_json_round_trip_is_exact() -> None:
    r = filled()
    d = json.loads(json.dumps(r.to_dict()))
    back = Report.from_dict(d)
    assert back == r
    assert isinstance(back.passes[0], PassRecord)
    assert isinstance(back.candidates[1], CandidateRecord)
    assert back.to_dict() == r.to_dict()


def test_created_is_set_and_nulls_read_as_empty() -> None:
    r = Report.from_dict({"model": "m", "pipeline": "p", "passes": None, "flops": None})
    assert r.created and r.passes == [] and r.flops == {}
    with pytest.raises(ValueError, match="passes\\[0\\]"):
        Report.from_dict({"model": "m", "pipeline": "p", "passes": [{"name": "x"}]})


@pytest.mark.parametrize("suffix", [".json", ".md", ".html", ".htm"])
def test_save_each_suffix(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "deep" / "dir" / f"report{suffix}"
    assert filled().save(path) == path
    text = path.read_text(encoding="utf-8")
    for needle in ("vit_small", "token_merging", "0.9931"):
        assert needle in text
    if suffix != ".json":  # renderings show the ratios, JSON holds the raw numbers
        assert "0.750" in text and "1.38" in text and "13.4 ms" in text
    else:
        assert Report.load(path) == filled()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_unsupported_suffix_raises(tmp_path: Path) -> None:
    for name in ("report.txt", "report"):
        with pytest.raises(ValueError, match=r"\.json.*\.md.*\.html"):
            filled().save(tmp_path / name)
    assert not any(tmp_path.iterdir())


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.json"
    Report("old", "p").save(path)
    before = path.read_text()

    def boom(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        filled().save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_load_directory_and_errors(tmp_path: Path) -> None:
    art = tmp_path / "artifact"
    filled().save(art / "report.json")
    assert Report.load(art) == filled()
    assert Report.load(str(art / "report.json")) == filled()
    with pytest.raises(FileNotFoundError, match="report.json"):
        Report.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no report"):
        Report.load(tmp_path / "missing.json")
    filled().save(tmp_path / "r.html")
    with pytest.raises(ValueError, match="only .json"):
        Report.load(tmp_path / "r.html")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON"):
        Report.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Report.load(tmp_path / "list.json")


def test_html_charts_tables_and_self_contained() -> None:
    page = render_html(filled())
    for ident in ('id="chart-tokens"', 'id="latency-table"', 'id="chart-pareto"'):
        assert ident in page
    assert page.count("<svg") == 2
    for bad in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert bad not in page
    assert "0.750×" in page and "1.38×" in page and "0.9931" in page


def test_html_escapes_strings() -> None:
    evil = "<script>alert(1)</script>"
    r = filled(model=evil, notes=[evil], device={"name": evil}, candidates=[
        CandidateRecord(evil, 0.5, fidelity=0.99, chosen=True, note=evil)])
    r.passes[0].reason = evil
    page = render_html(r)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    prose = re.sub(r"`[^`]*`", "", render_markdown(r))  # code spans show "<" literally
    assert not re.search(r"(?<!\\)<script", prose)  # and so does "\<"


def test_pareto_chart_only_with_candidates() -> None:
    assert 'id="chart-pareto"' not in render_html(filled(candidates=[]))
    assert "Candidates" not in render_markdown(filled(candidates=[]))
    unplottable = filled(candidates=[CandidateRecord("a"), CandidateRecord("b", chosen=True)])
    page = render_html(unplottable)
    assert 'id="chart-pareto"' not in page and "no candidate has both" in page


def test_empty_report_renders_everywhere(tmp_path: Path) -> None:
    r = Report(model="", pipeline="")
    assert "tcompile report" in r.summary()
    page, md = render_html(r), render_markdown(r)
    assert "<svg" not in page and "no per-layer token counts" in page
    assert "no passes recorded" in md
    for suffix in (".json", ".md", ".html"):
        r.save(tmp_path / f"e{suffix}")
    weird = Report("m", "p", tokens_per_layer={"baseline": [], "x": [None, 3]},
                   latency={"measured": {"baseline": 0.0, "optimized": None}}, fidelity={},
                   candidates=[CandidateRecord("only", flops_ratio=0.5, fidelity=0.9)])
    weird.summary(), render_html(weird), render_markdown(weird)


def test_summary_content() -> None:
    text = filled().summary()
    assert "vit_small" in text and "dedupe_qkv | token_merging" in text
    assert "9.2 GFLOP -> 6.9 GFLOP" in text and "0.750x" in text
    assert re.search(r"measured\s+13.4 ms -> 9.7 ms\s+speedup 1.38x", text)
    assert "197x12" in text and "[skipped] kv_evict{keep=0.5}" in text
    assert "encoder-only model" in text and "tokens_removed=96" in text
    chosen = [line for line in text.splitlines() if line.startswith("  *")]
    assert len(chosen) == 1 and "fastest within budget" in chosen[0]
    assert "measured on batch 8" in text


def test_markdown_tables_survive_pipes() -> None:
    md = render_markdown(filled())
    row = next(line for line in md.splitlines() if line.startswith("| 2 | **chosen**"))
    assert row.count(" | ") == 7 and "dedupe_qkv \\| token" in row  # 8 cells; the pipe escaped
    assert "| 11 | 197 | 117 |" in md


def test_chart_helpers() -> None:
    assert nice_ticks(0, 197) == [0, 50, 100, 150]
    assert nice_ticks(0.981, 0.998)[0] >= 0.981
    pts = [(0, 0.9, 0.998), (1, 0.73, 0.993), (2, 0.6, 0.981), (3, 0.78, 0.985)]
    assert [p[0] for p in pareto_front(pts)] == [2, 1, 0]


def _chromium() -> str | None:
    import shutil
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt install chromium) to render "
                                                 "the HTML report headless")
def test_html_renders_headless_in_chromium_with_its_charts(tmp_path: Path) -> None:
    """The saved report opens in a real browser without a network: Chromium renders it headless
    (a DOM dump and a screenshot) and the rendered DOM holds both charts with drawn marks."""
    import subprocess
    path = filled().save(tmp_path / "report.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for chart in ("chart-tokens", "chart-pareto"):
        svg = re.search(rf'<svg id="{chart}".*?</svg>', dom, re.S)
        assert svg is not None, f"{chart} missing from the rendered DOM"
        assert re.search(r"<(path|polyline|circle|rect)\b", svg.group(0)), f"{chart} has no drawn marks"
    table = re.search(r'<table[^>]*id="op-profile-table".*?</table>', dom, re.S)
    assert table is not None and "aten::addmm" in table.group(0), "the torch.profiler op table is missing"
    assert re.search(r'id="parts-table".*?encoder\.layer\.0', dom, re.S), "the per-block table is missing"
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000        # a page with content, not a blank frame
