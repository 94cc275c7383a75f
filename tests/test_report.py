"""Reports: spectra saved and read back exactly, the page and its PNGs, the CLI, a real browser."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import slicegpt
from conftest import DATA, TEXT, make_model
from slicegpt import cli
from slicegpt.formats.io import SPECTRA_NAME, load_spectra
from slicegpt.evaluation.report import (explained_variance, gather, load_bench, load_run, perplexity_series, spectra_figure,
                             throughput_data, write_report)

TEXT_FILE = str(DATA / "tempest_excerpt.txt")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _windows(tokenizer):
    from slicegpt.data import calibration_windows, tokenize

    return calibration_windows(tokenize(tokenizer, TEXT), samples=4, seqlen=64, seed=0)


def _speed(role: str, tokens_per_second: float, ms: float) -> list[dict]:
    common = dict(model=role, role=role, batch=1, seqlen=128, peak_bytes=0, weight_bytes=0)
    return [dict(common, phase="prefill", tokens_per_second=tokens_per_second, ms_per_token=128e3 / tokens_per_second),
            dict(common, phase="decode", tokens_per_second=1e3 / ms, ms_per_token=ms)]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tokenizer):
    """Three saved runs through the public API: per-layer 25% and 50%, uniform 25%, with figures."""
    root = tmp_path_factory.mktemp("runs")
    windows = _windows(tokenizer)
    for sparsity, rotation in [(0.25, "per-layer"), (0.5, "per-layer"), (0.25, "uniform")]:
        model, config = slicegpt.slice_model(make_model("llama"), tokenizer, windows, slicing=sparsity,
                                             rotation=rotation, neurons="off", progress=False)
        results = {"model": "tiny-llama", "perplexity_dense": 300.0, "perplexity_sliced": 300.0 * (1 + sparsity),
                   "eval_tokens": 256, "eval_data": "tempest",
                   "speed": _speed("dense", 1000.0, 20.0) + _speed("sliced", 1250.0, 16.0)}
        slicegpt.save(model, tokenizer, config, root / f"{rotation}-{int(100 * sparsity)}", extra={"results": results})
    return root


@pytest.fixture(scope="module")
def report(runs_dir):
    runs, benches = gather(sorted(runs_dir.iterdir()))
    return write_report(runs, benches, runs_dir.parent / "report")


def test_spectra_round_trip_exactly(tmp_path, tokenizer):
    for rotation in ("per-layer", "uniform"):
        model, config = slicegpt.slice_model(make_model("llama"), tokenizer, _windows(tokenizer), slicing=0.25,
                                             rotation=rotation, progress=False, neurons="off")
        out = slicegpt.save(model, tokenizer, config, tmp_path / rotation)
        loaded = load_spectra(out)
        # per-layer: one spectrum per boundary (embeddings + every step but the unsliced head's); uniform: pooled
        assert len(loaded) == (1 + 2 * 3 - 1 if rotation == "per-layer" else 1) == len(config.spectra)
        for saved, original in zip(loaded, config.spectra):
            assert saved.dtype == torch.float64 and torch.equal(saved, original.to(torch.float64))
        assert SPECTRA_NAME in json.loads((out / "slicegpt.json").read_text())["files"]  # checksummed
        assert slicegpt.load(out).sliced["slicing"]["sparsity"] == 0.25  # verify() accepts the new file


def test_old_directories_still_load_and_report_says_spectra_unavailable(runs_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs_dir / "per-layer-25", old)
    (old / SPECTRA_NAME).unlink()  # as written before spectra were saved
    manifest = json.loads((old / "slicegpt.json").read_text())
    del manifest["files"][SPECTRA_NAME]
    (old / "slicegpt.json").write_text(json.dumps(manifest))
    assert load_spectra(old) is None
    slicegpt.load(old)
    run = load_run(old)
    assert run.spectra is None
    page = write_report([run], [], tmp_path / "report").read_text()
    assert "Spectra unavailable for this run" in page

    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs_dir / "per-layer-25", corrupt)
    with open(corrupt / SPECTRA_NAME, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(slicegpt.SliceGPTError, match="checksum"):
        load_spectra(corrupt)


def test_cut_marker_is_at_the_sliced_width(runs_dir):
    for name in ("per-layer-25", "per-layer-50", "uniform-25"):
        run = load_run(runs_dir / name)
        data = explained_variance(run.spectra, run.sliced_hidden_size)
        assert data.cut == run.sliced_hidden_size == {"per-layer-25": 48, "per-layer-50": 32, "uniform-25": 48}[name]
        for curve, share, spectrum, kept in zip(data.curves, data.normalised, run.spectra, data.at_cut):
            assert np.all(np.diff(curve) >= 0) and curve[-1] == pytest.approx(1.0)
            assert kept == curve[data.cut - 1] == pytest.approx(spectrum[:data.cut].sum() / spectrum.sum())
            assert share == pytest.approx(spectrum / spectrum.sum())
        fig = spectra_figure(run, data)  # the drawn markers sit where the data says
        cuts = [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("cut d′")]
        assert len(cuts) == 2 and all(list(line.get_xdata()) == [data.cut, data.cut] for line in cuts)
        text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
        assert f"{100 * np.median(data.at_cut):.1f}%" in text  # the explained variance at the cut, written


def test_report_page_and_pngs(report, runs_dir):
    from PIL import Image

    out = report.parent
    page = report.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(sources) == pngs == ["perplexity.png", "spectra-1.png", "spectra-2.png", "spectra-3.png",
                                        "throughput.png"]
    for name in sources:
        assert not name.startswith(("/", "file:")) and (out / name).is_file()  # relative, beside the page
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert min(image.size) >= 300 and np.asarray(image.convert("L")).std() > 10
    for text in ("per-layer-50", "tiny-llama", "111,808", "450.000", "50%", "uniform"):
        assert text in page
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.")]  # no temporary left
    with pytest.raises(slicegpt.SliceGPTError, match="already exists"):
        write_report(*gather([runs_dir / "uniform-25"]), out)


def test_perplexity_and_throughput_data(runs_dir):
    runs, _ = gather(sorted(runs_dir.iterdir()))
    series = perplexity_series(runs)
    assert series == {"tiny-llama · per-layer": [(0.0, 300.0), (0.25, 375.0), (0.5, 450.0)],
                      "tiny-llama · uniform": [(0.0, 300.0), (0.25, 375.0)]}
    groups = throughput_data(runs, [])
    assert len(groups) == 3 and all(g.prefill_dense == 1000.0 and g.decode_sliced == 16.0 for g in groups)


def test_cli_slice_report_bench_and_report_over_runs(tiny_model_dir, tmp_path, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--neurons", "off", "--calibration", TEXT_FILE, "--samples", "4", "--seqlen", "64", "--eval-samples", "2"]
    # as a user runs it: a subprocess, with --report and its quick speed check
    result = subprocess.run([sys.executable, "-m", "slicegpt", "slice", str(tiny_model_dir), "--slicing", "0.25",
                             *common, "--out", str(tmp_path / "s25"), "--report", str(tmp_path / "r25"),
                             "--report-bench"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "report" in result.stdout and (tmp_path / "r25" / "index.html").is_file()
    assert {"perplexity.png", "throughput.png", "spectra-1.png"} <= {p.name for p in (tmp_path / "r25").iterdir()}
    record = json.loads((tmp_path / "s25" / "slicegpt.json").read_text())["results"]  # the run record
    assert record["perplexity_sliced"] > 0 and {r["role"] for r in record["speed"]} == {"dense", "sliced"}

    # the rest in-process (same code path as `main`; saves the interpreter start-ups)
    assert cli.main(["slice", str(tiny_model_dir), "--slicing", "0.5", *common, "--out", str(tmp_path / "s50")]) == 0
    bench = tmp_path / "bench.json"
    assert cli.main(["bench", str(tmp_path / "s50"), "--batch-sizes", "1", "--seqlens", "16", "--decode-tokens", "2",
                     "--repeats", "1", "--save", str(bench), "--json"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "bench-stdout.txt").write_text(printed)  # `bench --json > file` is a record too
    assert load_bench(tmp_path / "bench-stdout.txt").rows == load_bench(bench).rows
    assert {r["role"] for r in load_bench(bench).rows} == {"dense", "sliced"}

    result = subprocess.run([sys.executable, "-m", "slicegpt", "report", str(tmp_path / "s25"), str(tmp_path / "s50"),
                             str(bench), "--out", str(tmp_path / "both"), "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bench_records"] == 1 and len(figures["runs"]) == 2
    runs, benches = gather([tmp_path / "s25", tmp_path / "s50", bench])
    (label, points), = perplexity_series(runs).items()
    assert [s for s, _ in points] == [0.0, 0.25, 0.5]  # dense, then both runs
    assert len(throughput_data(runs, benches)) == 2  # the quick check of s25 and the bench of s50


@pytest.mark.parametrize("make_input, pattern", [
    (lambda tmp: tmp / "missing", "run directory not found"),
    (lambda tmp: (tmp / "plain").mkdir() or tmp / "plain", "not a slicegpt output directory"),
    (lambda tmp: (tmp / "x.json").write_text("{}") and tmp / "x.json", "not a slicegpt bench record"),
])
def test_report_bad_input_is_one_line(tmp_path, capsys, make_input, pattern):
    code = cli.main(["report", str(make_input(tmp_path)), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slicegpt: error: ") and re.search(pattern, lines[0]), err
    assert not (tmp_path / "r").exists()


def test_report_never_replaces_its_inputs(runs_dir, tiny_model_dir, tmp_path, capsys):
    run = runs_dir / "uniform-25"
    assert cli.main(["report", str(run), "--out", str(run), "--force"]) == 1
    assert "overlaps the run" in capsys.readouterr().err and (run / "slicegpt.json").is_file()
    assert cli.main(["slice", str(tiny_model_dir), "--size", "0.8", "--out", str(tmp_path / "m"),
                     "--report", str(tmp_path / "m" / "report")]) == 1
    assert "must be separate directories" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert cli.main(["slice", str(tiny_model_dir), "--size", "0.8", "--out", str(tmp_path / "m"),
                     "--report-bench"]) == 1
    assert "--report-bench applies to --report only" in capsys.readouterr().err


def _screenshot(page: Path, png: Path, size: str = "1280,1800") -> np.ndarray:
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
                        page.resolve().as_uri()], capture_output=True, timeout=120)
    assert png.is_file(), "chromium wrote no screenshot"
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it: "
                                             "apt-get install chromium)")
def test_page_renders_in_headless_chromium(report, tmp_path):
    """The page renders with its images: plot blue (#1f77b4) appears, and not in a copy whose PNGs are gone."""
    pixels = _screenshot(report, tmp_path / "page.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(report, broken / "index.html")
    broken_pixels = _screenshot(broken / "index.html", tmp_path / "broken.png")

    def plot_blue(image: np.ndarray) -> int:
        return int((np.abs(image - np.array([31, 119, 180])).max(axis=-1) < 30).sum())

    assert pixels.shape[:2] == (1800, 1280) and pixels.std() > 20  # not blank
    assert plot_blue(pixels) > 5_000, "the plots did not render"
    assert plot_blue(broken_pixels) < 100  # the check would fail on a page whose images do not load
    assert np.abs(pixels - broken_pixels).max(axis=-1).astype(bool).mean() > 0.1
