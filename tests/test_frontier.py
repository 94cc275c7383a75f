"""The size/quality frontier of GGUF files: the Pareto helper, its table and summary line on synthetic figures,
and `slicegpt report` drawing a bench/gguf_quant.py record (no model, no llama.cpp)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from slicegpt import SliceGPTError, cli
from slicegpt.evaluation.frontier import FRONTIER_KIND, MIB, mark_frontier, markdown_table, pareto_frontier, summary
from slicegpt.evaluation.report import frontier_figure, frontier_series, gather, load_frontier

# (MiB, perplexity) per type: dense, and two pruned outputs; shaped like the embedded default's figures
FIGURES = {
    ("dense", 1.0): {"f16": (258.3, 25.89), "q8_0": (138.1, 26.08), "q5_k_m": (110.0, 26.9), "q4_k_m": (100.6, 27.68),
                     "q4_0": (87.5, 31.85)},
    ("default 0.9", 0.9): {"f16": (232.0, 33.0), "q8_0": (131.0, 33.2), "q5_k_m": (100.0, 33.9),
                           "q4_k_m": (92.0, 35.0), "q4_0": (79.0, 38.0)},
    ("default 0.8", 0.8): {"f16": (206.9, 44.62), "q8_0": (126.5, 44.81), "q5_k_m": (92.0, 45.5),
                           "q4_k_m": (85.0, 47.78), "q4_0": (70.1, 48.82)},
}
FIGURE = {(label, kind): value for (label, _), types in FIGURES.items() for kind, value in types.items()}
ON_FRONTIER = {("default 0.8", "q4_0"), ("default 0.9", "q4_0"), ("dense", "q4_0"), ("dense", "q4_k_m"),
               ("dense", "q5_k_m"), ("dense", "q8_0"), ("dense", "f16")}


def _rows() -> list[dict]:
    return [{"model": label, "role": "dense" if label == "dense" else "sliced", "parameter_ratio": ratio,
             "type": kind, "bytes": round(mib * MIB), "perplexity": ppl, "tensor_types": {"q4_0": 210, "f32": 61}}
            for (label, ratio), types in FIGURES.items() for kind, (mib, ppl) in types.items()]


def _record(path, rows=None, **extra):
    record = {"kind": FRONTIER_KIND, "model": "default", "date": "2026-12-06", "commit": "abc1234",
              "machine": "x86_64, 2 cores, Linux", "evaluation": {"data": "shakespeare", "samples": 4, "seqlen": 128},
              "rows": _rows() if rows is None else rows, **extra}
    path.write_text(json.dumps(record))
    return path


def _brute_force(points):
    """The definition, spelled out: on the frontier unless another point is no larger, no worse, and not equal."""
    return [p is not None and not any(s2 <= s and q is not None and q <= p and (s2, q) != (s, p) for s2, q in points)
            for s, p in points]


def test_pareto_frontier_on_synthetic_points():
    assert pareto_frontier([]) == []
    assert pareto_frontier([(100, 30.0)]) == [True]
    # a smaller file with lower perplexity beats a point; a smaller one with higher perplexity does not
    assert pareto_frontier([(100, 30.0), (80, 25.0), (60, 40.0)]) == [False, True, True]
    # ties: equal size and lower perplexity beats; equal perplexity and smaller beats; identical points both stay
    assert pareto_frontier([(100, 30.0), (100, 29.0)]) == [False, True]
    assert pareto_frontier([(100, 30.0), (90, 30.0)]) == [False, True]
    assert pareto_frontier([(100, 30.0), (100, 30.0)]) == [True, True]
    # an unmeasured file is never on it and beats nothing
    assert pareto_frontier([(50, None), (100, 30.0), (60, float("nan"))]) == [False, True, False]
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = [(int(s), float(p)) for s, p in zip(rng.integers(1, 20, 12), rng.integers(1, 20, 12))]
        assert pareto_frontier(points) == _brute_force(points)
        front = sorted((s, p) for (s, p), on in zip(points, pareto_frontier(points)) if on)
        assert all(p2 < p1 for (s1, p1), (s2, p2) in zip(front, front[1:]) if s2 > s1)  # bigger only if better


def test_mark_frontier_table_and_summary():
    rows = mark_frontier(_rows())
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)  # smallest file first
    assert {(r["model"], r["type"]) for r in rows if r["frontier"]} == ON_FRONTIER
    table = markdown_table(_rows()).splitlines()
    assert table[0] == "| model | parameters (x dense) | type | MiB | llama.cpp perplexity | frontier | tensor types |"
    assert len(table) == 2 + 15 and all(line.count("|") == table[0].count("|") for line in table)
    assert table[2] == "| **default 0.8** | 0.800 | q4_0 | 70.1 | 48.82 | yes | 210 q4_0, 61 f32 |"
    assert "| default 0.8 | 0.800 | q4_k_m | 85.0 | 47.78 |  | 210 q4_0, 61 f32 |" in table
    assert table[-1].startswith("| **dense** | 1.000 | f16 | 258.3 | 25.89 | yes |")
    line = summary(_rows())
    assert "\n" not in line
    assert line.startswith("Pruning+quantization is on the size/quality frontier at 2 of 10 pruned files: "
                           "default 0.8 q4_0 (70.1 MiB, perplexity 48.82), default 0.9 q4_0 (79.0 MiB, perplexity "
                           "38.00), all smaller than the smallest dense file (q4_0, 87.5 MiB); off it at the other 8")
    assert line.endswith("frontier, smallest first: default 0.8 q4_0 70.1 MiB, default 0.9 q4_0 79.0 MiB, dense q4_0 "
                         "87.5 MiB, dense q4_k_m 100.6 MiB, dense q5_k_m 110.0 MiB, dense q8_0 138.1 MiB, dense f16 "
                         "258.3 MiB.")
    # the docs' old measurement: no pruned file on the frontier
    old = {"f16": (206.9, 44.62), "q8_0": (126.5, 44.81), "q4_0": (97.1, 48.82), "q4_k_m": (105.0, 47.78)}
    dense_wins = [r for r in _rows() if r["role"] == "dense"] + [
        {"model": "default 0.8", "role": "sliced", "type": t, "bytes": round(mib * MIB), "perplexity": p}
        for t, (mib, p) in old.items()]
    assert summary(dense_wins).startswith("Pruning+quantization is nowhere on the size/quality frontier: each of the "
                                          "4 pruned files has another file no larger and no worse; frontier, ")
    assert summary([r for r in _rows() if r["role"] == "dense"]).startswith("No pruned file was measured; frontier")


def test_report_draws_a_frontier_record(tmp_path, capsys):
    from PIL import Image

    record = _record(tmp_path / "gguf_quant-default-2026-12-06-abc1234.json")
    frontier = load_frontier(record)
    series = frontier_series(frontier)
    assert list(series) == ["dense", "default 0.9", "default 0.8"]  # dense first, then the record's order
    assert all([r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows) for rows in series.values())
    fig = frontier_figure(frontier)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"dense", "default 0.9 (0.900 of the parameters)", "default 0.8 (0.800 of the parameters)",
            "on the frontier"} <= set(lines)
    ringed = sorted(zip(lines["on the frontier"].get_xdata(), lines["on the frontier"].get_ydata()))
    assert np.allclose(ringed, sorted(FIGURE[k] for k in ON_FRONTIER), atol=1e-3)  # the highlighted points are the frontier's
    assert sorted(t.get_text() for t in ax.texts) == sorted(t for types in FIGURES.values() for t in types)

    out = tmp_path / "report"
    assert cli.main(["report", str(record), "--out", str(out), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["frontier_records"] == 1 and figures["bench_records"] == 0 and figures["files"] == [
        "frontier-1.png", "index.html"]
    page = (out / "index.html").read_text()
    assert "Size/quality frontier of GGUF files: default" in page and '<img src="frontier-1.png"' in page
    assert "commit abc1234" in page and "4 windows of 128 tokens of shakespeare" in page
    assert len(re.findall(r'<tr class="frontier">', page)) == len(ON_FRONTIER)
    assert '<tr class="frontier"><td>default 0.8</td><td class="num">0.800</td><td>q4_0</td>' in page
    assert "Pruning+quantization is on the size/quality frontier at 2 of 10 pruned files" in page
    assert "Perplexity versus sparsity" not in page  # a frontier-only page has no empty sections
    with Image.open(out / "frontier-1.png") as image:
        assert min(image.size) >= 300 and np.asarray(image.convert("L")).std() > 10


def _speed(role: str, tokens_per_second: float, ms: float) -> list[dict]:
    common = dict(model=role, role=role, batch=1, seqlen=128, peak_bytes=0, weight_bytes=0)
    return [dict(common, phase="prefill", tokens_per_second=tokens_per_second, ms_per_token=128e3 / tokens_per_second),
            dict(common, phase="decode", tokens_per_second=1e3 / ms, ms_per_token=ms)]


def test_frontier_beside_a_bench_record_and_bad_records(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"kind": "slicegpt-bench", "model": "s80", "device": "cpu",
                                 "rows": _speed("dense", 1000.0, 20.0) + _speed("sliced", 1250.0, 16.0)}))
    runs, records = gather([_record(tmp_path / "good.json"), bench])
    assert runs == [] and [type(r).__name__ for r in records] == ["Frontier", "Bench"]
    assert cli.main(["report", str(tmp_path / "good.json"), str(bench), "--out", str(tmp_path / "both")]) == 0
    assert {p.name for p in (tmp_path / "both").iterdir()} == {"frontier-1.png", "throughput.png", "index.html"}
    page = (tmp_path / "both" / "index.html").read_text()
    assert "1 bench record(s), 1 GGUF frontier record(s)" in page and "Throughput, dense versus sliced" in page
    capsys.readouterr()
    bad = _record(tmp_path / "bad.json", rows=[{"model": "dense", "role": "dense", "type": "f16"}])  # no bytes
    code = cli.main(["report", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "is not a GGUF frontier record" in lines[0]
    assert not (tmp_path / "r").exists()
    unmeasured = _rows()
    unmeasured[0]["perplexity"] = None  # a file llama.cpp did not score: in the table, not in the plot
    frontier = load_frontier(_record(tmp_path / "partial.json", rows=unmeasured))
    assert sum(len(rows) for rows in frontier_series(frontier).values()) == 14
    assert not next(r for r in frontier.rows if r["perplexity"] is None)["frontier"]
    (tmp_path / "x.json").write_text(json.dumps({"kind": "something else", "rows": [{"model": "dense"}]}))
    with pytest.raises(SliceGPTError, match="not a slicegpt bench record"):
        gather([tmp_path / "x.json"])


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed (scripts/setup.sh installs it: apt-get install chromium)")
def test_frontier_page_renders_in_headless_chromium(tmp_path):
    """The plot shows in a browser: the frontier's red (#d62728) rings and a sliced series' blue (#1f77b4)."""
    from test_report import _screenshot

    out = tmp_path / "report"
    assert cli.main(["report", str(_record(tmp_path / "record.json")), "--out", str(out)]) == 0
    pixels = _screenshot(out / "index.html", tmp_path / "page.png", size="1280,1000")

    def count(image, rgb) -> int:
        return int((np.abs(image - np.array(rgb)).max(axis=-1) < 30).sum())

    assert count(pixels, [214, 39, 40]) > 400 and count(pixels, [31, 119, 180]) > 400, "the plot did not render"
    (out / "frontier-1.png").unlink()  # the check fails on a page whose image does not load
    assert count(_screenshot(out / "index.html", tmp_path / "broken.png", size="1280,1000"), [214, 39, 40]) < 50
