"""Turn saved slicing runs (and bench records) into one HTML page with PNG plots beside it.

Three questions a user asks after slicing, one figure each: how much of the signal the cut
kept at every block boundary (PCA spectra and cumulative explained variance, cut d' marked),
what each sparsity costs in perplexity (per rotation), and what it buys in speed (prefill
tokens/s and decode ms/token, dense against sliced). A fourth, for deployment: at one GGUF file
size, is a pruned model better than a more quantized dense one (the size/quality frontier that
bench/gguf_quant.py records). Everything is read from what `slice`, `bench` and the benchmark
saved, so a report can be rebuilt from directories at any time.

Plots use matplotlib's Agg canvas on `Figure` objects directly (never pyplot), so no global
figure registry or rc state is touched. The page is written to a temporary directory and
renamed into place (`atomic.atomic_directory`).
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.frontier import FRONTIER_KIND, MIB, mark_frontier, mib, summary, tensor_summary

BENCH_KIND = "slicegpt-bench"  # the "kind" of a record written by `slicegpt bench --save/--json`
DPI = 100
DENSE_COLOR, SLICED_COLOR, CUT_COLOR = "#7f7f7f", "#1f77b4", "#d62728"
ROTATION_COLORS = {"per-layer": "#1f77b4", "uniform": "#ff7f0e"}


@dataclass
class Run:
    """One saved sliced directory, as the report needs it."""

    path: str
    name: str
    model: str
    model_type: str
    sparsity: float
    rotation: str
    hidden_size: int
    sliced_hidden_size: int
    parameters_dense: int
    parameters_sliced: int
    perplexity_dense: float | None = None
    perplexity_sliced: float | None = None
    evaluation: str = ""  # what the perplexities were measured on
    spectra: list[np.ndarray] | None = None  # None: the directory predates saved spectra
    speed: list[dict] = field(default_factory=list)  # quick dense/sliced rows from `slice --report-bench`


@dataclass
class Bench:
    """One `slicegpt bench` record: SpeedRow dicts with a role (dense, sliced or model)."""

    name: str
    device: str
    rows: list[dict]


@dataclass
class Frontier:
    """One bench/gguf_quant.py record: GGUF files of a dense model and its sliced outputs, each with its size
    and llama.cpp perplexity; `rows` smallest first, each marked `frontier` (recomputed, not read)."""

    name: str
    model: str
    about: str  # when, at which commit and on what the perplexities were measured
    rows: list[dict]
    models: list[str]  # the rows' models in the record's order (dense first)

    @property
    def summary(self) -> str:
        return summary(self.rows)


@dataclass
class ExplainedVariance:
    """What the spectra figure draws for one run (tests check the cut against d')."""

    cut: int  # d': directions kept at every boundary
    normalised: list[np.ndarray]  # eigenvalues / their sum, largest first, per boundary
    curves: list[np.ndarray]  # curves[b][k - 1]: share of the variance in the top k directions
    at_cut: np.ndarray  # curves[b][cut - 1] per boundary: what slicing kept

    @property
    def boundaries(self) -> int:
        return len(self.curves)


@dataclass
class ThroughputGroup:
    """Dense and sliced speed at one setting of one source (a run's quick check or a bench)."""

    label: str
    prefill_dense: float | None  # tokens/s
    prefill_sliced: float
    decode_dense: float | None  # ms/token
    decode_sliced: float


# ---------------------------------------------------------------------------------------------
# Reading what slice and bench saved


def load_run(directory: str | os.PathLike) -> Run:
    """A run from a slicegpt output directory; SliceGPTError if it is not one."""
    from slicegpt.formats.io import load_spectra, read_manifest
    from slicegpt.modeling.runtime import MANIFEST_NAME

    path = Path(directory)
    if not path.exists():
        raise SliceGPTError(f"run directory not found: {path}")
    if not path.is_dir() or not (path / MANIFEST_NAME).is_file():
        raise SliceGPTError(f"{path} is not a slicegpt output directory (no {MANIFEST_NAME}) "
                            "nor a bench record (.json)")
    manifest = read_manifest(path)
    slicing, results = manifest.get("slicing"), manifest.get("results", {})
    if not isinstance(slicing, dict) or "sparsity" not in slicing:
        raise SliceGPTError(f"{path / MANIFEST_NAME} has no slicing record; it was not written by slicegpt slice")
    spectra = load_spectra(path)
    evaluation = ""
    if results.get("eval_tokens"):
        evaluation = f"{results['eval_tokens']:,} tokens" + (f" of {results['eval_data']}"
                                                              if results.get("eval_data") else "")
    return Run(path=str(path), name=path.name, model=_model_name(str(results.get("model") or ""),
                                                                 str(slicing.get("source_model") or "")),
               model_type=slicing.get("model_type", ""), sparsity=float(slicing["sparsity"]),
               rotation=slicing.get("rotation", "per-layer"), hidden_size=int(slicing.get("hidden_size", 0)),
               sliced_hidden_size=int(slicing.get("sliced_hidden_size", 0)),
               parameters_dense=int(slicing.get("parameters_dense", 0)),
               parameters_sliced=int(slicing.get("parameters_sliced", 0)),
               perplexity_dense=results.get("perplexity_dense"), perplexity_sliced=results.get("perplexity_sliced"),
               evaluation=evaluation,
               spectra=None if spectra is None else [s.numpy() for s in spectra],
               speed=list(results.get("speed", [])))


def _model_name(given: str, source: str) -> str:
    """Short and recognisable: a path's last part; an alias ("default") with the file it stands for."""
    if given and (Path(given).exists() or given.startswith(("/", "./", "../", "~"))):  # not a hub id
        return Path(given).name
    if given and source and source != given:
        return f"{given} ({Path(source).stem})"
    return given or Path(source).name or "?"


def _role(row: dict) -> str:
    """dense / sliced / model; older bench JSON has no role, but its names say it."""
    if row.get("role"):
        return row["role"]
    name = str(row.get("model", ""))
    return "dense" if name.startswith("dense") else "sliced" if name.endswith("(sliced)") else "model"


def _read_record(path: Path) -> object:
    """A JSON file, or the JSON on its last line (`--json` output saved whole); None if neither."""
    if not path.is_file():
        raise SliceGPTError(f"bench record not found: {path}")
    text = path.read_text(errors="replace")
    for candidate in (text, (text.strip().splitlines() or [""])[-1]):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def load_bench(path: str | os.PathLike) -> Bench:
    """A bench record: `bench --save FILE`, or `bench --json` output (its last line is the JSON)."""
    path = Path(path)
    return _bench(_read_record(path), path)


def _bench(record: object, path: Path) -> Bench:
    needed = {"phase", "batch", "seqlen", "tokens_per_second", "ms_per_token"}
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or not all(
            isinstance(r, dict) and needed <= set(r) for r in record["rows"]):
        raise SliceGPTError(f"{path} is not a slicegpt bench record (write one with `slicegpt bench --save FILE`)")
    rows = [dict(r, role=_role(r)) for r in record["rows"]]
    return Bench(name=str(record.get("model") or path.stem), device=str(record.get("device", "?")), rows=rows)


def load_frontier(path: str | os.PathLike) -> Frontier:
    """A GGUF size/quality record written by bench/gguf_quant.py (kind FRONTIER_KIND)."""
    path = Path(path)
    return _frontier(_read_record(path), path)


def _frontier(record: object, path: Path) -> Frontier:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    rows = record.get("rows") if isinstance(record, dict) and record.get("kind") == FRONTIER_KIND else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"model", "role", "type", "bytes"} <= set(r) and number(r["bytes"])
            and r["bytes"] > 0 and (r.get("perplexity") is None or number(r["perplexity"])) for r in rows):
        raise SliceGPTError(f"{path} is not a GGUF frontier record (bench/gguf_quant.py writes one): it needs "
                            "rows with model, role, type, bytes and perplexity")
    evaluation = record.get("evaluation") or {}
    about = ", ".join(str(x) for x in (
        record.get("date"), record.get("commit") and f"commit {record['commit']}", record.get("machine"),
        evaluation.get("samples") and f"llama.cpp perplexity on {evaluation['samples']} windows of "
                                      f"{evaluation.get('seqlen')} tokens of {evaluation.get('data', '?')}") if x)
    roles = {str(r["model"]): r["role"] for r in rows}
    models = sorted(roles, key=lambda m: roles[m] != "dense")  # stable: the record's order otherwise
    return Frontier(name=path.stem, model=str(record.get("model") or "?"), about=about, rows=mark_frontier(rows),
                    models=models)


def load_record(path: str | os.PathLike) -> Bench | Frontier:
    """A JSON record by its kind: a GGUF frontier record, else a bench record."""
    path = Path(path)
    record = _read_record(path)
    if isinstance(record, dict) and record.get("kind") == FRONTIER_KIND:
        return _frontier(record, path)
    return _bench(record, path)


def gather(paths: list[str | os.PathLike]) -> tuple[list[Run], list[Bench | Frontier]]:
    """Directories are runs, files are records (bench or GGUF frontier); anything else is refused by name."""
    runs, records = [], []
    for p in map(Path, paths):
        if p.is_file() or p.suffix == ".json":
            records.append(load_record(p))
        else:
            runs.append(load_run(p))
    return runs, records


# ---------------------------------------------------------------------------------------------
# The data each figure draws (kept apart from drawing so tests can check it)


def explained_variance(spectra: list[np.ndarray], cut: int) -> ExplainedVariance:
    """Normalised spectra and cumulative explained variance per boundary, and their value at `cut`.

    Eigenvalues of a covariance are >= 0; rounding can leave tiny negatives, clipped to 0.
    """
    if not spectra:
        raise SliceGPTError("no spectra to plot")
    normalised, curves = [], []
    for values in spectra:
        v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
        total = v.sum()
        share = v / total if total > 0 else np.full_like(v, 1.0 / len(v))
        normalised.append(share)
        curves.append(np.cumsum(share))
    width = len(curves[0])
    if not 1 <= cut <= width:
        raise SliceGPTError(f"the cut {cut} is outside the spectrum's {width} directions")
    return ExplainedVariance(cut, normalised, curves, np.array([c[cut - 1] for c in curves]))


def series_label(run: Run) -> str:
    return f"{run.model} · {run.rotation}"


def perplexity_series(runs: list[Run]) -> dict[str, list[tuple[float, float]]]:
    """(sparsity, perplexity) per model and rotation, the dense point at 0 first, sparsity ascending.

    Runs of one model with different dense perplexities (different evaluation text) each add
    their dense point; `_notes` says so on the page.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.perplexity_sliced is None:
            continue
        points = series.setdefault(series_label(run), [])
        if run.perplexity_dense is not None and (0.0, run.perplexity_dense) not in points:
            points.append((0.0, float(run.perplexity_dense)))
        points.append((run.sparsity, float(run.perplexity_sliced)))
    return {k: sorted(v) for k, v in series.items()}


def _speed_pair(rows: list[dict], phase: str, batch: int, seqlen: int, role: str) -> dict | None:
    return next((r for r in rows if (r["phase"], r["batch"], r["seqlen"], r["role"]) == (phase, batch, seqlen, role)),
                None)


def throughput_data(runs: list[Run], benches: list[Bench]) -> list[ThroughputGroup]:
    """One group per (source, batch, prompt length) that has a sliced (or single) measurement."""
    sources = [(f"{r.name}\n(quick check)", r.speed) for r in runs if r.speed]
    sources += [(Path(b.name).name or b.name, b.rows) for b in benches if isinstance(b, Bench)]
    groups = []
    for label, rows in sources:
        settings = sorted({(r["batch"], r["seqlen"]) for r in rows})
        for batch, seqlen in settings:
            for role in ("sliced", "model"):
                pre, dec = (_speed_pair(rows, ph, batch, seqlen, role) for ph in ("prefill", "decode"))
                if pre and dec:
                    break
            else:
                continue
            dpre, ddec = (_speed_pair(rows, ph, batch, seqlen, "dense") for ph in ("prefill", "decode"))
            groups.append(ThroughputGroup(f"{label}\nbatch {batch} × prompt {seqlen}",
                                          dpre["tokens_per_second"] if dpre else None, pre["tokens_per_second"],
                                          ddec["ms_per_token"] if ddec else None, dec["ms_per_token"]))
    return groups


def frontier_series(frontier: Frontier) -> dict[str, list[dict]]:
    """The measured rows per model (dense first, then the sliced outputs in the record's order), smallest
    file first; each row keeps its `frontier` mark."""
    series: dict[str, list[dict]] = {m: [] for m in frontier.models}
    for row in frontier.rows:  # smallest first
        if row.get("perplexity") is not None and math.isfinite(row["perplexity"]):
            series[str(row["model"])].append(row)
    return {label: rows for label, rows in series.items() if rows}


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, Agg canvas, no pyplot)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def spectra_figure(run: Run, data: ExplainedVariance):
    """Normalised eigenvalues (log), cumulative explained variance, and what the cut kept per boundary."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    pooled = data.boundaries == 1  # uniform rotation: one spectrum of the pooled covariance
    fig = _figure(13.0 if not pooled else 10.0, 4.2)
    axes = fig.subplots(1, 2 if pooled else 3)
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(data.boundaries - 1, 1))
    color = (lambda b: SLICED_COLOR) if pooled else (lambda b: cmap(norm(b)))
    ks = np.arange(1, len(data.curves[0]) + 1)
    cut_label = f"cut d′ = {data.cut}"

    ax = axes[0]
    for b, share in enumerate(data.normalised):
        ax.plot(ks, np.maximum(share, 1e-12), color=color(b), lw=1.0, alpha=0.9)
    ax.set_yscale("log")
    ax.axvline(data.cut, color=CUT_COLOR, ls="--", lw=1.5, label=cut_label)
    ax.set(xlabel="principal direction (largest first)", ylabel="eigenvalue / sum of eigenvalues",
           title="eigenvalue spectrum" + (" (pooled)" if pooled else " per boundary"), xlim=(1, ks[-1]))
    ax.legend(loc="upper right", fontsize=9)

    # Logit axis: what matters is how close to 100% each curve is at the cut (99% vs 99.99%),
    # which a linear axis squeezes into one line. The last point (exactly 100%) is left out.
    ax = axes[1]
    low = max(min(float(c[0]) for c in data.curves), 1e-3)
    high = min(max(float(c[-2]) for c in data.curves) if len(ks) > 1 else 0.999, 1 - 1e-7)
    for b, curve in enumerate(data.curves):
        ax.plot(ks[:-1], np.clip(curve[:-1], low, high), color=color(b), lw=1.0, alpha=0.9)
    ax.set_yscale("logit")
    ticks = [t for t in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999) if low <= t <= high]
    ax.set_yticks(ticks, [f"{100 * t:.{max(0, round(-math.log10(1 - t)) - 2)}f}%" for t in ticks])
    ax.yaxis.set_minor_formatter("")
    ax.axvline(data.cut, color=CUT_COLOR, ls="--", lw=1.5, label=cut_label)
    kept = 100 * data.at_cut
    text = (f"kept at d′: {kept[0]:.1f}%" if pooled else
            f"kept at d′ = {data.cut}:\nmin {kept.min():.1f}%  median {np.median(kept):.1f}%\nmax {kept.max():.1f}%")
    ax.text(0.97, 0.05, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
            bbox=dict(boxstyle="round", fc="white", ec="#bbbbbb"))
    ax.set(xlabel="directions kept k", ylabel="explained variance (logit scale)",
           title="cumulative explained variance", xlim=(1, ks[-1]), ylim=(low, high))
    ax.legend(loc="upper left", fontsize=9)
    if not pooled:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[:2], label="boundary (0 = embeddings)",
                     shrink=0.9, pad=0.01)
        ax = axes[2]
        ax.plot(np.arange(data.boundaries), kept, "o-", color=SLICED_COLOR, ms=3, lw=1.2)
        ax.set(xlabel="boundary (0 = after the embeddings)", ylabel=f"explained variance at d′ = {data.cut} (%)",
               title="what the cut kept, per boundary")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.name}: {run.model}, sparsity {run.sparsity:.0%}, {run.rotation} rotation, "
                 f"d = {run.hidden_size} → d′ = {run.sliced_hidden_size}", fontsize=11)
    return fig


def perplexity_figure(series: dict[str, list[tuple[float, float]]]):
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    values = [p for points in series.values() for _, p in points]
    for i, (label, points) in enumerate(series.items()):
        rotation = label.rsplit(" · ", 1)[-1]
        color = ROTATION_COLORS.get(rotation) if len(series) <= 2 else palette[i % len(palette)]
        xs, ys = [100 * s for s, _ in points], [p for _, p in points]
        ax.plot(xs, ys, "o-", color=color or palette[i % len(palette)], label=label, lw=1.5, ms=5)
        for x, y in zip(xs, ys):
            if x == 0.0 and i > 0:  # the dense point is labelled once
                continue
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    dense = [p for points in series.values() for s, p in points if s == 0.0]
    if dense:
        ax.plot([0.0] * len(dense), dense, "k*", ms=11, label="dense", zorder=5)
    if values and max(values) / min(values) > 5:
        ax.set_yscale("log")
    ax.set(xlabel="sparsity (% of the hidden size removed)", ylabel="perplexity (lower is better)",
           title="perplexity versus sparsity")
    ax.margins(x=0.08, y=0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def frontier_figure(frontier: Frontier):
    """Perplexity (log) against file size: one series per model, points labelled by GGUF type, the Pareto
    frontier drawn as the best perplexity at each size (a staircase) with its points ringed."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = _figure(11.5, 5.2)
    ax = fig.subplots()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    series = frontier_series(frontier)
    sliced = 0
    for label, rows in series.items():
        dense = rows[0]["role"] == "dense"
        color = DENSE_COLOR if dense else palette[sliced % len(palette)]
        sliced += not dense
        ratio = rows[0].get("parameter_ratio")
        name = label if dense or not isinstance(ratio, (int, float)) else f"{label} ({ratio:.3f} of the parameters)"
        xs, ys = [r["bytes"] / MIB for r in rows], [r["perplexity"] for r in rows]
        ax.plot(xs, ys, "s-" if dense else "o-", color=color, label=name, lw=1.2, ms=6, zorder=3)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(7, 6), fontsize=8, color=color)
    front = [r for rows in series.values() for r in rows if r["frontier"]]
    front.sort(key=lambda r: r["bytes"])
    if front:
        xs, ys = [r["bytes"] / MIB for r in front], [r["perplexity"] for r in front]
        right = max(r["bytes"] for rows in series.values() for r in rows) / MIB
        ax.step(xs + [right], ys + [ys[-1]], where="post", color=CUT_COLOR, ls="--", lw=1.2, zorder=2,
                label="Pareto frontier: best perplexity at each size")
        ax.plot(xs, ys, "o", ms=14, mfc="none", mec=CUT_COLOR, mew=1.8, zorder=4, label="on the frontier")
    values = [r["perplexity"] for rows in series.values() for r in rows]
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if values and max(values) / min(values) < 10:  # under a decade: label the minor ticks too (20, 30, 40)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set(xlabel="file size (MiB)", ylabel="llama.cpp perplexity (log scale; lower is better)",
           title=f"size/quality frontier: {frontier.model}")
    ax.margins(x=0.08, y=0.08)
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right upper", fontsize=9)  # beside the axes: points crowd every corner
    return fig


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def throughput_figure(groups: list[ThroughputGroup]):
    fig = _figure(max(9.0, 2.6 * len(groups) + 3.0), 4.8)
    axes = fig.subplots(1, 2)
    x = np.arange(len(groups))
    w = 0.38
    panels = [("prefill", "prefill tokens/s (higher is better)", lambda g: (g.prefill_dense, g.prefill_sliced), True),
              ("decode", "decode ms/token (lower is better)", lambda g: (g.decode_dense, g.decode_sliced), False)]
    for ax, (title, ylabel, get, higher) in zip(axes, panels):
        dense = [get(g)[0] for g in groups]
        sliced = [get(g)[1] for g in groups]
        bars = [ax.bar(x - w / 2, [d or 0.0 for d in dense], w, color=DENSE_COLOR, label="dense"),
                ax.bar(x + w / 2, sliced, w, color=SLICED_COLOR, label="sliced")]
        for xi, d, s in zip(x, dense, sliced):  # values written out: groups of different models share the axis
            if d:
                ax.annotate(_short(d), (xi - w / 2, d), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=8)
            speedup = f"\n{s / d if higher else d / s:.2f}×" if d else ""
            ax.annotate(f"{_short(s)}{speedup}", (xi + w / 2, s), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=8)
        ax.set_xticks(x, [g.label for g in groups], fontsize=8)
        ax.set(ylabel=ylabel, title=title, xlim=(-0.75, len(groups) - 0.25))
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(bars, ["dense", "sliced (× = speedup over dense)"], loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle("throughput, dense versus sliced", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# The page


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _notes(runs: list[Run]) -> list[str]:
    notes = []
    by_series: dict[str, set] = {}
    for run in runs:
        if run.perplexity_dense is not None:
            by_series.setdefault(series_label(run), set()).add((round(run.perplexity_dense, 6), run.evaluation))
    for label, seen in by_series.items():
        if len(seen) > 1:
            values = ", ".join(sorted(f"{p:.3f} on {e or '?'}" for p, e in seen))
            notes.append(f"The runs of {label} report different dense perplexities ({values}): they were "
                         "evaluated on different text, so their points do not share one scale.")
    missing = [r.name for r in runs if r.perplexity_sliced is None]
    if missing:
        notes.append(f"No perplexity recorded for {', '.join(missing)} (saved through the Python API or with "
                     "--no-eval); measure with `slicegpt eval DIR`.")
    return notes


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1340px;
       padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 0.3em; } .meta, .note { color: #555; } .note { font-style: italic; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
tr.frontier td { background: #fdecea; font-weight: 600; }
"""


def _table(runs: list[Run], kept: dict[int, ExplainedVariance]) -> str:
    head = ("run", "model", "sparsity", "rotation", "d → d′", "params dense", "params sliced", "ratio",
            "perplexity dense", "perplexity sliced", "evaluated on", "explained variance at d′ (median)")
    rows = []
    for i, r in enumerate(runs):
        ratio = r.parameters_sliced / r.parameters_dense if r.parameters_dense else None
        ev = f"{100 * float(np.median(kept[i].at_cut)):.1f}%" if i in kept else "—"
        cells = [(r.name, ""), (r.model, ""), (f"{r.sparsity:.0%}", "num"), (r.rotation, ""),
                 (f"{r.hidden_size} → {r.sliced_hidden_size}", "num"), (f"{r.parameters_dense:,}", "num"),
                 (f"{r.parameters_sliced:,}", "num"), (_fmt(ratio, ".3f"), "num"),
                 (_fmt(r.perplexity_dense, ".3f"), "num"), (_fmt(r.perplexity_sliced, ".3f"), "num"),
                 (r.evaluation or "—", ""), (ev, "num")]
        rows.append("<tr>" + "".join(f'<td class="{c}">{html.escape(v)}</td>' if c else f"<td>{html.escape(v)}</td>"
                                     for v, c in cells) + "</tr>")
    return ("<table>\n<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n"
            + "\n".join(rows) + "\n</table>")


def _frontier_table(frontier: Frontier) -> str:
    head = ("model", "parameters (× dense)", "type", "MiB", "llama.cpp perplexity", "on the frontier", "tensor types")
    rows = []
    for r in frontier.rows:
        ratio = r.get("parameter_ratio")
        cells = [(str(r["model"]), ""), (_fmt(ratio if isinstance(ratio, (int, float)) else None, ".3f"), "num"),
                 (str(r["type"]), ""), (mib(r["bytes"]), "num"), (_fmt(r.get("perplexity"), ".2f"), "num"),
                 ("yes" if r["frontier"] else "", ""), (tensor_summary(r), "")]
        rows.append(('<tr class="frontier">' if r["frontier"] else "<tr>")
                    + "".join(f'<td class="{c}">{html.escape(v)}</td>' if c else f"<td>{html.escape(v)}</td>"
                              for v, c in cells) + "</tr>")
    return ("<table>\n<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n"
            + "\n".join(rows) + "\n</table>")


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def write_report(runs: list[Run], records: list[Bench | Frontier], out: str | os.PathLike,
                 force: bool = False) -> Path:
    """Write `out/index.html` with its PNGs atomically; returns the page's path. `records`: bench
    records and GGUF frontier records, as `gather` returns them."""
    from slicegpt.atomic import atomic_directory

    if not runs and not records:
        raise SliceGPTError("nothing to report: pass slicegpt output directories or bench records")
    benches = [r for r in records if isinstance(r, Bench)]
    frontiers = [r for r in records if isinstance(r, Frontier)]
    out = Path(out)
    target = out.resolve()
    for source in [r.path for r in runs]:
        if target == Path(source).resolve() or target in Path(source).resolve().parents:
            raise SliceGPTError(f"the report directory {out} would replace the run {source}; choose another --out")
    kept = {i: explained_variance(r.spectra, r.sliced_hidden_size) for i, r in enumerate(runs)
            if r.spectra and 1 <= r.sliced_hidden_size <= len(r.spectra[0])}
    series = perplexity_series(runs)
    groups = throughput_data(runs, benches)
    with atomic_directory(out, force=force) as tmp:
        counted = f"{len(runs)} run(s), {len(benches)} bench record(s)" + (
            f", {len(frontiers)} GGUF frontier record(s)" if frontiers else "")
        parts = [f"<h1>slicegpt report</h1>\n<p class=\"meta\">{counted}; "
                 f"written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
        if runs:
            parts += ["<h2>Runs</h2>", _table(runs, kept)]
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in _notes(runs)]

        for i, frontier in enumerate(frontiers):
            parts.append(f"<h2>Size/quality frontier of GGUF files: {html.escape(frontier.model)}</h2>")
            parts.append(f'<p class="meta">{html.escape(frontier.name)}: {html.escape(frontier.about)}. On the '
                         'frontier: no other file is at most as large and at most as perplexing.</p>')
            if frontier_series(frontier):
                name = f"frontier-{i + 1}.png"
                frontier_figure(frontier).savefig(tmp / name)
                parts.append(_img(name, f"size/quality frontier of {frontier.model}"))
            parts += [_frontier_table(frontier), f"<p>{html.escape(frontier.summary)}</p>"]
        if runs or benches or not frontiers:  # not on a page of frontier records only
            parts += _sparsity_and_speed(runs, series, groups, tmp)
        for i, run in enumerate(runs):
            if i == 0:
                parts.append("<h2>Spectra and explained variance per block boundary</h2>")
                parts.append('<p class="meta">Eigenvalues of the calibration covariance of the residual stream; the '
                             'cut keeps the top d′ directions. Per-layer rotation: one spectrum per block boundary; '
                             'uniform rotation: one spectrum of the covariance pooled over all boundaries.</p>')
            parts.append(f"<h3>{html.escape(run.name)}</h3>")
            if i in kept:
                name = f"spectra-{i + 1}.png"
                spectra_figure(run, kept[i]).savefig(tmp / name)
                parts.append(_img(name, f"spectra of {run.name}"))
            else:
                parts.append('<p class="note">Spectra unavailable for this run: its directory was saved before '
                             'slicegpt recorded them (re-slice to get them).</p>')
        page = ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>slicegpt report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
                + "\n".join(parts) + "\n</body>\n</html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _sparsity_and_speed(runs: list[Run], series: dict, groups: list[ThroughputGroup], tmp: Path) -> list[str]:
    """The perplexity-versus-sparsity and throughput sections (each says so when it has nothing to draw)."""
    parts = ["<h2>Perplexity versus sparsity</h2>"]
    if series:
        perplexity_figure(series).savefig(tmp / "perplexity.png")
        parts.append(_img("perplexity.png", "perplexity versus sparsity"))
    else:
        parts.append('<p class="note">No perplexities recorded in these runs.</p>')

    parts.append("<h2>Throughput, dense versus sliced</h2>")
    if groups:
        throughput_figure(groups).savefig(tmp / "throughput.png")
        parts.append(_img("throughput.png", "throughput dense versus sliced"))
        if any(r.speed for r in runs):
            parts.append('<p class="note">“quick check”: measured by <code>slice --report-bench</code> at batch 1 — '
                         'the dense model before slicing, the sliced one after, not in turns, so a change of load '
                         'on the machine reads as a speedup; <code>slicegpt bench DIR --save FILE</code> measures '
                         'in turns: pass FILE here.</p>')
    else:
        parts.append('<p class="note">No speed measurements: pass a record from '
                     '<code>slicegpt bench DIR --save FILE</code>.</p>')
    return parts
