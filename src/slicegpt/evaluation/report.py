"""Turn saved slicing runs (and bench records) into one HTML page with PNG plots beside it.

Three questions a user asks after slicing, one figure each: how much of the signal the cut
kept at every block boundary (PCA spectra and cumulative explained variance, cut d' marked),
what each sparsity costs in perplexity (per rotation), and what it buys in speed (prefill
tokens/s and decode ms/token, dense against sliced). Everything is read from what `slice`
and `bench` saved, so a report can be rebuilt from directories at any time.

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


def load_bench(path: str | os.PathLike) -> Bench:
    """A bench record: `bench --save FILE`, or `bench --json` output (its last line is the JSON)."""
    path = Path(path)
    if not path.is_file():
        raise SliceGPTError(f"bench record not found: {path}")
    text = path.read_text(errors="replace")
    record = None
    for candidate in (text, (text.strip().splitlines() or [""])[-1]):
        try:
            record = json.loads(candidate)
            break
        except json.JSONDecodeError:
            continue
    needed = {"phase", "batch", "seqlen", "tokens_per_second", "ms_per_token"}
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list) or not all(
            isinstance(r, dict) and needed <= set(r) for r in record["rows"]):
        raise SliceGPTError(f"{path} is not a slicegpt bench record (write one with `slicegpt bench --save FILE`)")
    rows = [dict(r, role=_role(r)) for r in record["rows"]]
    return Bench(name=str(record.get("model") or path.stem), device=str(record.get("device", "?")), rows=rows)


def gather(paths: list[str | os.PathLike]) -> tuple[list[Run], list[Bench]]:
    """Directories are runs, files are bench records; anything else is refused by name."""
    runs, benches = [], []
    for p in map(Path, paths):
        if p.is_file() or p.suffix == ".json":
            benches.append(load_bench(p))
        else:
            runs.append(load_run(p))
    return runs, benches


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
    sources += [(Path(b.name).name or b.name, b.rows) for b in benches]
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


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def write_report(runs: list[Run], benches: list[Bench], out: str | os.PathLike, force: bool = False) -> Path:
    """Write `out/index.html` with its PNGs atomically; returns the page's path."""
    from slicegpt.atomic import atomic_directory

    if not runs and not benches:
        raise SliceGPTError("nothing to report: pass slicegpt output directories or bench records")
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
        parts = [f"<h1>slicegpt report</h1>\n<p class=\"meta\">{len(runs)} run(s), {len(benches)} bench record(s); "
                 f"written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
        if runs:
            parts += ["<h2>Runs</h2>", _table(runs, kept)]
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in _notes(runs)]

        parts.append("<h2>Perplexity versus sparsity</h2>")
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

        if runs:
            parts.append("<h2>Spectra and explained variance per block boundary</h2>")
            parts.append('<p class="meta">Eigenvalues of the calibration covariance of the residual stream; the '
                         'cut keeps the top d′ directions. Per-layer rotation: one spectrum per block boundary; '
                         'uniform rotation: one spectrum of the covariance pooled over all boundaries.</p>')
        for i, run in enumerate(runs):
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
