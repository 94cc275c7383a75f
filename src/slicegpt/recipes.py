"""Recipes: named presets of the levers. A run is a recipe plus a size (`slicegpt.plan`).

Each lever is documented where the plan resolves it (`Levers`); docs/how-it-works.md explains
what each one does and the measurements behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from slicegpt.core.compensation import DENSE_SHARE, RIDGE
from slicegpt.errors import SliceGPTError

ROTATIONS = ("per-layer", "uniform")
COMPENSATIONS = ("off", "writers", "all")
WIDTH_RULES = ("equal", "adaptive", "auto")
HEADS = ("auto", "untied", "sliced", "fit")
POOLINGS = ("unit-trace", "tokens")
ALLOCATIONS = ("equal", "measured")


@dataclass(frozen=True)
class Levers:
    """Every choice of how to cut, resolved: a recipe's values with the user's overrides."""

    rotation: str = "per-layer"  # per-layer: a basis per boundary, skip matrices; uniform: one basis, a stock model
    compensate: str = "off"  # refit each step's writers ("writers") or readers too ("all") against the dense model
    # compensation's regulariser, relative to the mean input energy (unless given: MIXED_RIDGE where MLP neurons
    # are pruned beside a sliced stream, `plan.make_plan`)
    ridge: float = RIDGE
    dense_share: float = DENSE_SHARE  # compensation: share of the calibration windows the dense model runs on
    neurons: float | str | None = None  # MLP neurons kept per layer: None (all), "auto", or a fraction
    # how the pruned neurons are shared among layers: the same count everywhere (a stock class), or
    # "measured": each layer's by its measured cost on one scale (core.allocation), the same total
    allocation: str = "equal"
    heads: float | str | None = None  # attention heads kept per layer: None (all), "auto", a fraction, or "GxR"
    # one width everywhere, each boundary its own within the size ("adaptive", from the dense stream's spectra),
    # or "auto": adaptive where MLP neurons are pruned beside a sliced stream, else equal
    widths: str = "equal"
    head: str = "auto"  # a tied head: kept tied where exact (auto), untied, its input sliced, or a fitted gain
    pooling: str = "unit-trace"  # uniform: how the boundaries' covariances are weighed
    accept_deviation: bool = False  # uniform: write a stock model that only approximates the sliced one
    round_to: int = 8  # widths and neuron counts are multiples of this


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    levers: Levers
    samples: int = 32  # calibration windows when --samples is not given (the count its figures were measured on)


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        "default",
        "the measured best: MLP neurons pruned first (OBS, at least 40% kept per layer) while every step's "
        "writers are refitted against the dense model; the stream is sliced (per-layer rotation) only for what "
        "neurons cannot give, each boundary to its own width by the dense stream's spectrum (--widths auto), the "
        "fits there with ridge 0.03. Where neurons alone meet the size nothing is rotated: a stock model. Each layer "
        "keeps as many neurons as its measured loss says (--allocation measured): the output keeps the family's "
        "layers, each MLP its own width. While the stream stays whole, attention head layouts are weighed "
        "against neurons by the same measured loss; Gemma 2/3, whose neurons cannot be pruned beside a sliced "
        "stream, prune attention heads past the neuron floor before slicing the stream (--heads auto).",
        Levers(compensate="writers", neurons="auto", heads="auto", allocation="measured", widths="auto")),
    "max": Recipe(
        "max",
        "the default's levers with the dense model on every calibration window (--dense-share 1) and four "
        "times the calibration (128 windows): the best measured, for about five times the default's slicing "
        "time. SmolLM2 at 0.5 of its parameters: 72.57 held-out perplexity against the default's 79.77.",
        Levers(compensate="writers", neurons="auto", heads="auto", allocation="measured", widths="auto",
               dense_share=1.0),
        samples=128),
    "paper": Recipe(
        "paper",
        "the paper's algorithm, number for number: per-layer PCA rotation, equal widths, no refit, no neurons "
        "pruned. Its own size is --slicing (the share of the hidden width removed).",
        Levers()),
}
DEFAULT_RECIPE = "default"
LEVER_NAMES = tuple(f.name for f in fields(Levers))


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SliceGPTError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def parse_neurons(value: float | str | None) -> float | str | None:
    """`--neurons`: "auto", "off" / 1 (keep every neuron: None), or the fraction of neurons to keep."""
    if value is None or value in ("off", "all"):
        return None
    if value == "auto":
        return "auto"
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise SliceGPTError(f"--neurons is auto, off or the fraction of MLP neurons to keep, got {value!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise SliceGPTError(f"--neurons is the fraction of MLP neurons to keep, in (0, 1]; got {value}")
    return None if fraction == 1.0 else fraction


def parse_heads(value: float | str | None) -> float | str | None:
    """`--heads`: "off" / 1 (keep every head: None), "auto" (heads go only past the neuron floor, see
    `slicegpt.plan.auto_heads`), the fraction of query heads to keep, or "GxR": G key/value heads with R
    query heads each (kept per layer)."""
    if value is None or value in ("off", "all"):
        return None
    if value == "auto":
        return "auto"
    text = str(value).strip().lower()
    groups, sep, per_group = text.partition("x")
    if sep:
        if not (groups.isdigit() and per_group.isdigit() and int(groups) > 0 and int(per_group) > 0):
            raise SliceGPTError(f"--heads GxR keeps G key/value heads with R query heads each, e.g. 2x3; got {value!r}")
        return f"{int(groups)}x{int(per_group)}"
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise SliceGPTError(f"--heads is off, auto, the fraction of attention heads to keep, or GxR (G key/value heads "
                            f"with R query heads each), got {value!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise SliceGPTError(f"--heads is the fraction of attention heads to keep, in (0, 1]; got {value}")
    return None if fraction == 1.0 else fraction


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SliceGPTError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")


def resolve_levers(recipe: Recipe, overrides: dict) -> Levers:
    """The recipe's levers with `overrides` (name -> value, None meaning "the recipe's"), checked."""
    unknown = set(overrides) - set(LEVER_NAMES)
    if unknown:
        raise SliceGPTError(f"unknown lever(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in overrides.items() if v is not None}
    if "neurons" in values:
        values["neurons"] = parse_neurons(values["neurons"])
    if "heads" in values:
        values["heads"] = parse_heads(values["heads"])
    levers = Levers(**{**{f: getattr(recipe.levers, f) for f in LEVER_NAMES}, **values})
    _choice("rotation", levers.rotation, ROTATIONS)
    _choice("compensate", levers.compensate, COMPENSATIONS)
    _choice("widths", levers.widths, WIDTH_RULES)
    _choice("head", levers.head, HEADS)
    _choice("pooling", levers.pooling, POOLINGS)
    _choice("allocation", levers.allocation, ALLOCATIONS)
    if not 0 <= levers.dense_share <= 1:  # (NaN too)
        raise SliceGPTError(f"--dense-share must be in [0, 1], got {levers.dense_share}")
    if not levers.ridge > 0:
        raise SliceGPTError(f"--ridge must be positive, got {levers.ridge} (--compensate off turns the refit off)")
    if not isinstance(levers.round_to, int) or levers.round_to < 1:
        raise SliceGPTError(f"--round-to must be a positive integer, got {levers.round_to}")
    return levers
