"""The size/quality frontier of model files: which files no other file beats on size and perplexity at once.

The question it answers: at one file size, is a pruned model better than a more quantized dense one?
`bench/gguf_quant.py` measures GGUF files of a dense model and of sliced outputs at several types
(file size, llama.cpp perplexity) and saves them as a record of kind FRONTIER_KIND; it prints the
table and the summary below, and `slicegpt report` draws the same record.

A row is a dict: `model` (its label: "dense", or a sliced output's "recipe size"), `role` ("dense" or
"sliced"), `type` (the GGUF type), `bytes`, `perplexity` (None when not measured), and optionally
`parameter_ratio` and `tensor_types` ({type: tensor count}).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FRONTIER_KIND = "gguf_frontier"  # the "kind" of a record written by bench/gguf_quant.py
MIB = 2 ** 20


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def pareto_frontier(points: Sequence[tuple[float, float | None]]) -> list[bool]:
    """For each (size, perplexity): whether it is on the frontier, both lower being better.

    A point is on it when no other point is at most as large and at most as perplexing while
    strictly better in one of the two (two identical points are both on it). A point without a
    finite perplexity is never on it and beats nothing.
    """
    measured = [(s, p) for s, p in points if _finite(p)]
    return [_finite(p) and not any(s2 <= s and p2 <= p and (s2, p2) != (s, p) for s2, p2 in measured)
            for s, p in points]


def mark_frontier(rows: Sequence[dict]) -> list[dict]:
    """Copies of the rows, smallest file first, each with `frontier` set (True/False)."""
    flags = pareto_frontier([(r["bytes"], r.get("perplexity")) for r in rows])
    marked = [dict(r, frontier=f) for r, f in zip(rows, flags)]
    return sorted(marked, key=lambda r: (r["bytes"], r["perplexity"] if _finite(r.get("perplexity")) else math.inf))


def mib(size: int) -> str:
    """A file size in MiB: one decimal, three significant digits below 10 MiB (test models)."""
    return f"{size / MIB:.1f}" if size >= 10 * MIB else f"{size / MIB:.3g}"


def _ppl(value) -> str:
    return f"{value:.2f}" if _finite(value) else "-"


def tensor_summary(row: dict) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in (row.get("tensor_types") or {}).items())


def markdown_table(rows: Sequence[dict]) -> str:
    """Smallest file first; frontier rows marked (and their model set bold)."""
    lines = ["| model | parameters (x dense) | type | MiB | llama.cpp perplexity | frontier | tensor types |",
             "|---|---|---|---|---|---|---|"]
    for r in mark_frontier(rows):
        name = f"**{r['model']}**" if r["frontier"] else r["model"]
        ratio = r.get("parameter_ratio")
        lines.append(f"| {name} | {_ratio(ratio)} | {r['type']} | {mib(r['bytes'])} | {_ppl(r.get('perplexity'))} "
                     f"| {'yes' if r['frontier'] else ''} | {tensor_summary(r)} |")
    return "\n".join(lines)


def _ratio(value) -> str:
    return f"{value:.3f}" if _finite(value) else "-"


def _point(row: dict) -> str:
    return f"{row['model']} {row['type']}"


def summary(rows: Sequence[dict]) -> str:
    """One line: where pruning plus quantization is on the frontier and where not."""
    marked = mark_frontier(rows)
    front = [r for r in marked if r["frontier"]]
    members = "frontier, smallest first: " + ", ".join(f"{_point(r)} {mib(r['bytes'])} MiB" for r in front)
    pruned = [r for r in marked if r["role"] != "dense" and _finite(r.get("perplexity"))]
    if not pruned:
        return "No pruned file was measured; " + members + "."
    on = [r for r in pruned if r["frontier"]]
    if not on:
        return (f"Pruning+quantization is nowhere on the size/quality frontier: each of the {len(pruned)} pruned "
                f"files has another file no larger and no worse; {members}.")
    where = ", ".join(f"{_point(r)} ({mib(r['bytes'])} MiB, perplexity {_ppl(r['perplexity'])})" for r in on)
    dense = [r for r in marked if r["role"] == "dense" and _finite(r.get("perplexity"))]
    if dense:  # pruning often wins only where quantizing the dense model cannot go smaller
        below = sum(r["bytes"] < dense[0]["bytes"] for r in on)
        smallest = f"the smallest dense file ({dense[0]['type']}, {mib(dense[0]['bytes'])} MiB)"
        where += (f", {'all' if below == len(on) else f'{below} of them'} smaller than {smallest}" if below
                  else f", none smaller than {smallest}")
    off = len(pruned) - len(on)
    rest = f"; off it at the other {off} (each has another file no larger and no worse)" if off else ""
    count = f"all {len(pruned)}" if not off else f"{len(on)} of {len(pruned)}"
    return f"Pruning+quantization is on the size/quality frontier at {count} pruned files: {where}{rest}; {members}."
