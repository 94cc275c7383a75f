"""One planning step: every decision of a slicing run, made once from frozen settings, before any work.

A run is a recipe plus a size (`SliceSettings`). `make_plan` resolves the recipe's levers with
the user's overrides, validates them against each other, the size and the model (an option the
run would ignore is refused in one line), and decides the layout: which boundaries keep which
width, how many MLP neurons each layer keeps, whether the head stays tied, what rotation runs
and what class the output is, with its predicted parameter count. It needs only the model's
shapes (`core.onload.ConfigModel`: config.json alone), so `slicegpt slice --dry-run` prints it in
seconds; a real run prints the same plan first, follows it, and records it (`record`).

Only adaptive widths are left to the run: they are chosen from the calibration spectra.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from slicegpt.adapters import ADAPTERS, ModelAdapter
from slicegpt.adapters.base import branch_groups
from slicegpt.config import SlicingConfig
from slicegpt.core.allocation import allocate_neurons, neuron_cost
from slicegpt.core.bases import sliced_dim
from slicegpt.core.budget import parameter_model
from slicegpt.core.compensation import MIXED_RIDGE
from slicegpt.core.engine import per_layer_ties
from slicegpt.core.uniform import uniform_ties
from slicegpt.core.onload import LayeredModel
from slicegpt.core.weights import attention_heads
from slicegpt.core.widths import head_layout, neurons_need_full_width, no_heads_message, plan_widths
from slicegpt.data import DEFAULT_DATA
from slicegpt.errors import SliceGPTError
from slicegpt.formats.standard import check_standard
from slicegpt.modeling.runtime import get_path
from slicegpt.recipes import DEFAULT_RECIPE, LEVER_NAMES, Levers, get_recipe, resolve_levers
from slicegpt.version import __version__

NEURONS_ONLY = "neurons only"  # the layout where the stream keeps its width and basis


@dataclass(frozen=True)
class SliceSettings:
    """What the user asked for: a recipe, a size, expert overrides (None: the recipe's), calibration.

    Size has one meaning: `size`, the fraction of the dense model's parameters that remains
    (every parameter counted). `slicing` is the paper's own measure instead, the fraction of the
    hidden width removed, for runs that prune no neurons (the paper recipe)."""

    recipe: str = DEFAULT_RECIPE
    size: float | None = None
    slicing: float | None = None
    # expert levers (recipes.Levers); None keeps the recipe's value
    rotation: str | None = None
    compensate: str | None = None
    ridge: float | None = None
    dense_share: float | None = None
    neurons: float | str | None = None
    heads: float | str | None = None
    allocation: str | None = None
    widths: str | None = None
    head: str | None = None
    pooling: str | None = None
    accept_deviation: bool | None = None
    round_to: int | None = None
    standard: bool = True  # uniform rotation: the family's stock class (False: slicegpt's own format)
    # calibration
    calibration: str = DEFAULT_DATA
    samples: int | None = None  # calibration windows; None: the recipe's (32; the max recipe's 128)
    seqlen: int = 1024
    seed: int = 0
    text_field: str = "text"
    batch_size: int = 4

    @property
    def calibration_samples(self) -> int:
        """The calibration windows: `samples`, or the recipe's own count."""
        return self.samples if self.samples is not None else get_recipe(self.recipe).samples

    def overrides(self) -> dict:
        return {name: getattr(self, name) for name in LEVER_NAMES if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        return {k: (str(v) if k == "calibration" else v) for k, v in asdict(self).items()}


def settings_from(settings: SliceSettings | None = None, **changes) -> SliceSettings:
    """`settings` (or the defaults) with `changes`; unknown names fail in one line."""
    known = {f.name for f in fields(SliceSettings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise SliceGPTError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return replace(settings or SliceSettings(), **changes)


@dataclass(frozen=True)
class Plan:
    """Every decision of the run. `widths` is None only for adaptive widths (chosen at run time)."""

    settings: SliceSettings
    levers: Levers
    model: str
    model_type: str
    family: str
    architecture: str
    dtype: str
    hidden: int
    steps: int  # residual steps (block boundaries: steps + 1)
    dense_parameters: int
    dense_neurons: int | None
    layout: str  # NEURONS_ONLY, "per-layer" or "uniform"
    width_rule: str
    widths: tuple[int, ...] | None
    neurons: int | None
    slice_head: bool
    keep_tied_head: bool
    fit_tied_head: bool
    tied_head: bool | None  # None: uniform rotation decides by the final norm's gain, read with the weights
    standard: bool  # the output is the family's stock class
    deviations: tuple[str, ...]
    predicted_parameters: int | None  # None: adaptive widths (the budget holds)
    budget: int | None  # the parameter count the size allows (`size`)
    heads: tuple[int, int] | None = None  # attention heads kept per layer: (key/value heads, query heads each)
    dense_heads: tuple[int, int] | None = None  # the dense model's (None: the family describes no heads)
    # MLP neurons per layer when measured allocation shares them (chosen at run time from the probe;
    # their mean is `neurons`)
    layer_neurons: tuple[int, ...] | None = None
    # `--heads auto` with measured allocation: the probe's cost of each head layout weighed (with the
    # neurons that layout leaves to prune), "GxR" or "all" -> cost; None until the run has probed
    head_costs: dict[str, float] | None = None
    version: str = __version__

    @property
    def measured(self) -> bool:
        """Each layer keeps its own count of MLP neurons, by measured loss (`core.allocation`)."""
        return self.levers.allocation == "measured" and self.neurons is not None

    @property
    def heads_by_loss(self) -> bool:
        """`--heads auto` weighs attention heads against MLP neurons by measured loss (`choose_heads`):
        measured allocation, heads the family describes, and the stream kept whole."""
        return (self.levers.heads == "auto" and self.measured and self.identity and self.dense_heads is not None)

    @property
    def stock_class(self) -> bool:
        """The output is the family's stock class as transformers defines it (one MLP width)."""
        return self.standard and not self.measured

    @property
    def identity(self) -> bool:
        """Only MLP neurons (or attention heads) are pruned: nothing is rotated, an exact stock model."""
        return self.layout == NEURONS_ONLY

    @property
    def rotation(self) -> str:
        """The engine's rotation: uniform (with the identity basis) when only neurons are pruned."""
        return "uniform" if self.identity else self.layout

    @property
    def output(self) -> str:
        if self.standard and self.measured:
            return (f"{self.architecture} layers, each MLP its own width (slicegpt format: slicegpt.load or "
                    "from_pretrained with trust_remote_code; GGUF export)")
        if self.standard:
            return f"stock {self.architecture} (plain transformers from_pretrained; GGUF export)"
        if self.layout == "uniform":
            return f"slicegpt format ({self.architecture}, one basis; slicegpt.load)"
        return (f"slicegpt format ({self.architecture} with a matrix on every skip connection; slicegpt.load "
                "or from_pretrained with trust_remote_code)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(settings=self.settings.to_dict(), output=self.output, rotation=self.rotation)
        return data

    def rows(self) -> list[tuple[str, str]]:
        """The plan as `slicegpt slice` prints it before any work (and alone with --dry-run)."""
        lv, s = self.levers, self.settings
        size = (f"{s.size:g} of the dense parameters" if s.size is not None
                else f"slicing {s.slicing:g} of the hidden width (the paper's measure)")
        comp = "off" if lv.compensate == "off" else (
            f"{lv.compensate} (ridge {lv.ridge:g}, dense model on {lv.dense_share:g} of the windows)")
        rows = [("model", f"{self.model} ({self.model_type}, {self.family} family, {self.dtype})"),
                ("recipe", f"{s.recipe}: {size}"),
                ("calibration", f"{s.calibration_samples} x {s.seqlen} tokens of {s.calibration}"),
                ("compensation", comp)]
        if self.identity:
            pruned = " and ".join(name for name, count in (("MLP neurons", self.neurons),
                                                           ("attention heads", self.heads)) if count is not None)
            rows.append(("layout", f"{pruned} pruned, the stream unrotated at its full width"))
        else:
            widths = (f"{self.width_rule}: {_widths_text(self.widths, self.hidden)}" if self.widths is not None
                      else "adaptive: chosen from the calibration spectra within the budget")
            rows += [("rotation", self.layout + (f", pooling {lv.pooling}" if self.layout == "uniform" else "")),
                     ("hidden width", widths)]
        if self.dense_neurons is not None:
            rows.append(("MLP neurons", _neurons_text(self)))
        if self.dense_heads is not None:
            chosen = " per layer, none pruned"
            if self.heads is not None:
                chosen = f" -> {_heads_text(self.heads)} per layer"
            if self.heads_by_loss:
                chosen = (" per layer; how many stay is weighed against MLP neurons by measured loss, chosen at run "
                          "time" if self.head_costs is None else chosen + " (weighed against MLP neurons by measured "
                                                                          "loss)")
            rows.append(("attention heads", _heads_text(self.dense_heads) + chosen))
        rows.append(("head", _head_text(self)))
        predicted = (f"{self.dense_parameters:,} -> {self.predicted_parameters:,} "
                     f"({self.predicted_parameters / self.dense_parameters:.1%})"
                     if self.predicted_parameters is not None else
                     f"{self.dense_parameters:,} -> at most {self.budget:,} (the budget)")
        rows += [("parameters", predicted), ("output", self.output)]
        if self.deviations:
            rows.append(("deviation", "; ".join(self.deviations)))
        return rows


def _neurons_text(plan: Plan) -> str:
    if plan.neurons is None:
        return f"{plan.dense_neurons} per layer, none pruned"
    if not plan.measured:
        return f"{plan.dense_neurons} -> {plan.neurons} per layer"
    chosen = (f" ({min(plan.layer_neurons)}..{max(plan.layer_neurons)})" if plan.layer_neurons is not None
              else ", chosen at run time")
    return f"{plan.dense_neurons} -> {plan.neurons} per layer on average, each layer's count by measured loss{chosen}"


def _widths_text(widths: tuple[int, ...], hidden: int) -> str:
    distinct = sorted(set(widths[:-1]))
    inner = f"{hidden} -> {distinct[0]}" if len(distinct) == 1 else f"{hidden} -> {distinct[0]}..{distinct[-1]}"
    return inner + ("" if widths[-1] == widths[0] else f" (the head reads {widths[-1]})")


def _heads_text(heads: tuple[int, int]) -> str:
    groups, per_group = heads
    return f"{groups * per_group} ({groups} key/value x {per_group} query)"


def _head_text(plan: Plan) -> str:
    if plan.tied_head is None:
        return "tied to the embeddings if the final norm's gain is uniform (read with the weights), else untied"
    if plan.identity:
        return "as in the dense model" + (" (tied to the embeddings)" if plan.tied_head else "")
    if plan.fit_tied_head:
        return "tied, with a fitted final-norm gain"
    if plan.tied_head:
        return "tied to the unsliced embeddings" + (" (an entry matrix on the first layer)"
                                                    if plan.layout == "per-layer" else "")
    return "untied" + (", its input sliced" if plan.slice_head else ", reading the full width")


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise SliceGPTError(message)


def _check_size(settings: SliceSettings, levers: Levers) -> None:
    size, slicing = settings.size, settings.slicing
    _refuse(size is None and slicing is None, "give a size: --size FRACTION (the share of the dense parameters "
                                              "to keep, e.g. 0.8) or, for the paper recipe, --slicing FRACTION")
    _refuse(size is not None and slicing is not None, "give one size: --size or --slicing, not both")
    if size is not None:
        _refuse(not 0.0 < size < 1.0 or math.isnan(size),
                f"--size is the share of the dense parameters to keep, in (0, 1), e.g. 0.8; got {size}")
        return
    _refuse(not 0.0 < slicing < 1.0 or math.isnan(slicing),
            f"--slicing is the share of the hidden width to remove, in (0, 1), e.g. 0.25; got {slicing}")


def _prunes_heads(settings: SliceSettings, levers: Levers) -> bool:
    """Whether --heads asks for heads to go: a layout, or `auto` given by the user (a recipe's `auto`
    prunes nothing where it cannot apply)."""
    return levers.heads not in (None, "auto") or (levers.heads == "auto" and "heads" in settings.overrides())


def _check_slicing_alone(settings: SliceSettings, levers: Levers) -> None:
    """--slicing sizes a sliced stream; a run that also prunes neurons is sized by --size."""
    if settings.slicing is None:
        return
    _refuse(_prunes_heads(settings, levers), f"--heads {levers.heads} prunes attention heads, so the run's size is --size; "
                                      "--slicing sizes a sliced stream alone (drop --heads, or give --size)")
    if "neurons" in settings.overrides():
        _refuse(levers.neurons is not None,
                f"--neurons {levers.neurons} prunes MLP neurons, so the run's size is --size; --slicing sizes "
                "a sliced stream alone (drop --neurons, or give --size)")
    _refuse(levers.neurons is not None,
            f"--slicing is the paper's measure of a sliced stream; the {settings.recipe} recipe also prunes MLP "
            "neurons, so its size is --size (or add --neurons off to slice the stream alone)")


def _check_levers(settings: SliceSettings, levers: Levers) -> None:
    """Combinations no model could run, and options the levers make meaningless."""
    given = settings.overrides()
    uniform = levers.rotation == "uniform"
    if levers.compensate == "off":
        _refuse(_prunes_heads(settings, levers),
                "pruning attention heads refits the output projection, so it needs compensation: "
                + ("drop --compensate off" if "compensate" in given else "add --compensate writers"))
        _refuse(levers.neurons is not None,
                "pruning MLP neurons refits the down projection, so it needs compensation: "
                + ("drop --compensate off" if "compensate" in given else "add --compensate writers")
                + (" (or --neurons off)" if "neurons" not in given else ""))
        for name in ("ridge", "dense_share"):
            _refuse(name in given, f"--{name.replace('_', '-')} applies to compensation, which is off here "
                                   f"(--compensate writers turns it on)")
    _refuse(uniform and levers.widths == "adaptive",
            "--widths adaptive applies to per-layer rotation (uniform rotation has one basis, one width)")
    for name in ("pooling", "accept_deviation"):
        _refuse(name in given and not uniform, f"--{name.replace('_', '-')} applies to --rotation uniform only")
    _refuse(uniform and levers.head in ("untied", "sliced"),
            f"--head {levers.head} applies to per-layer rotation (uniform rotation always slices the head's "
            "input and unties it only where it must)")
    _refuse(not uniform and levers.head == "fit", "--head fit applies to --rotation uniform only")
    _refuse("accept_deviation" in given and not settings.standard,
            "--accept-deviation applies to a stock output (standard=True)")


def _engine_head(levers: Levers, adapter: ModelAdapter) -> tuple[bool, bool, bool]:
    """(slice_head, keep_tied_head, fit_tied_head) as the engine takes them."""
    uniform = levers.rotation == "uniform"
    slice_head = uniform or levers.head == "sliced" or adapter.slice_head_required
    return slice_head, levers.head != "untied", levers.head == "fit"


def _ties(view: LayeredModel, adapter: ModelAdapter, levers: Levers, slice_head: bool, keep: bool,
          fit: bool) -> bool | None:
    """Whether the head stays tied; None where uniform rotation decides by the final norm's gain and
    the plan reads no weights (a dry run)."""
    if levers.rotation == "per-layer":
        return per_layer_ties(view, adapter, keep, slice_head)
    if view.device.type != "meta":
        return uniform_ties(view, adapter, fit)
    if not view.ties_head(adapter.head, adapter.embeddings[0]) or adapter.norm_kind != "rmsnorm":
        return False
    return True if fit else None


def _refuse_ignored_by_identity(settings: SliceSettings) -> None:
    given = settings.overrides()
    ignored = [f"--{n.replace('_', '-')}" for n in ("rotation", "head", "pooling", "accept_deviation") if n in given]
    if given.get("widths") == "adaptive":
        ignored.append("--widths adaptive")
    _refuse(bool(ignored), f"at this size the {settings.recipe} recipe prunes MLP neurons only: the stream keeps "
                           f"its width and nothing is rotated, so {', '.join(ignored)} would do nothing "
                           "(drop it, or choose a smaller --size)")


def check_settings(settings: SliceSettings) -> Levers:
    """The checks that need no model (run first, before any slow work); returns the resolved levers."""
    levers = resolve_levers(get_recipe(settings.recipe), settings.overrides())
    _check_size(settings, levers)
    _check_levers(settings, levers)
    _check_slicing_alone(settings, levers)
    check_counts(samples=settings.samples, seqlen=settings.seqlen, batch_size=settings.batch_size)
    return levers


def check_counts(**counts: int | None) -> None:
    """Refuse a count below 1 by its flag (a batch size of 0 would fail only after the dense evaluation);
    None means "not given"."""
    for name, value in counts.items():
        _refuse(value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1),
                f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _check_round_to(levers: Levers, hidden: int, neurons: int | None) -> None:
    """A grid coarser than the model would cut nothing (or keep more neurons than there are)."""
    _refuse(levers.round_to > hidden, f"--round-to {levers.round_to} is larger than the model's hidden size "
                                      f"{hidden}: no width could be cut (widths are multiples of --round-to)")
    _refuse(levers.neurons is not None and neurons is not None and levers.round_to > neurons,
            f"--round-to {levers.round_to} is larger than the model's {neurons} MLP neurons per layer: none could "
            "be pruned (neuron counts are multiples of --round-to)")


def head_candidates(dense: tuple[int, int]) -> list[tuple[int, int]]:
    """Every smaller layout (key/value heads, query heads each), the most heads first and, of equal
    counts, the fewest key/value groups first (whole groups go before query heads within groups)."""
    groups, per_group = dense
    return sorted(((g, r) for g in range(1, groups + 1) for r in range(1, per_group + 1) if (g, r) != dense),
                  key=lambda gr: (-gr[0] * gr[1], gr[0]))


def auto_heads(dense: tuple[int, int], hidden: int, widths_for) -> tuple[int, int] | None:
    """`--heads auto` (the default recipe's) in families whose MLP neurons cannot be pruned beside a
    sliced stream (Gemma 2/3: branch-output norms), where past the neuron floor the stream alone
    would be sliced and no neuron pruned: no head is pruned while MLP neurons alone meet the size;
    past their floor, the most heads with which the neurons (at or above the floor) meet the size
    with the stream whole are kept, so the output stays a stock model (Gemma 3 270M at 0.8: 1x2
    of 1x4 heads instead of a stream 88 of 640 wide). Where even one head per layer would not do,
    every head stays (None) and the stream is sliced as before. Elsewhere neurons at the floor and a
    sliced stream did better than heads (SmolLM2 at 0.5: 89.15 against 102.04 with 1x2 of 3x3
    heads), so `auto` prunes no heads there. `widths_for(layout)` is plan_widths for a head layout,
    without the calibration batches: the choice needs no spectra, so a dry run makes the same one
    and adaptive widths are probed only for the layout kept."""
    def whole(layout: tuple[int, int] | None) -> bool:
        widths = widths_for(layout)[0]
        return widths is not None and all(w == hidden for w in widths)

    if whole(None):
        return None
    return next((layout for layout in head_candidates(dense) if whole(layout)), None)


def make_plan(settings: SliceSettings, view: LayeredModel, adapter: ModelAdapter, *, model: str,
              dense_parameters: int, batches=None, ranks=None, progress: bool = False, offload: str = "cpu",
              offload_dir=None, spectra=None) -> Plan:
    """Decide the run (see the module docstring). `batches` (this rank's calibration batches) are
    needed only for adaptive widths; without them those widths stay None. `offload`, `offload_dir`:
    where the spectra probe keeps its activations (the run's own setting); `spectra`: the boundaries'
    eigenvalues when the run has probed them already (`allocation.probe_costs`)."""
    levers = check_settings(settings)
    config = view.model.config
    hidden = get_path(view.model, adapter.embeddings[0]).weight.shape[-1]
    _check_round_to(levers, hidden, getattr(config, adapter.config_neurons, None) if adapter.config_neurons else None)
    if settings.slicing is not None:
        _refuse(sliced_dim(hidden, settings.slicing, levers.round_to) >= hidden,
                f"--slicing {settings.slicing:g} removes nothing: the model is {hidden} wide, and widths are "
                f"multiples of {levers.round_to}")
    source_tied = view.ties_head(adapter.head, adapter.embeddings[0])
    _refuse(levers.head in ("untied", "fit") and not source_tied,
            f"this model's head is not tied to its embeddings: --head {levers.head} has nothing to do")
    slice_head, keep, fit = _engine_head(levers, adapter)
    uniform = levers.rotation == "uniform"
    deviations = check_standard(view.model, adapter, levers.accept_deviation) if uniform and settings.standard else []
    tied = _ties(view, adapter, levers, slice_head, keep, fit)
    dense_heads = attention_heads(view.model, adapter)
    auto = levers.heads == "auto"
    described = ", ".join(t for a in ADAPTERS if any(b.heads for b in a.branches) for t in a.model_types)
    heads = None if auto else head_layout(levers.heads, dense_heads, adapter.family, described)
    _refuse(auto and "heads" in settings.overrides() and dense_heads is None,
            no_heads_message(adapter.family, described))

    def widths_for(heads: tuple[int, int] | None, batches=batches) -> tuple[list[int] | None, str, int | None]:
        return plan_widths(
            view, adapter, batches, rotation=levers.rotation, rule=levers.widths, sparsity=settings.slicing or 0.0,
            parameters=settings.size, dense_parameters=dense_parameters, round_to=levers.round_to,
            tied=bool(tied), slice_head=slice_head, progress=progress, ranks=ranks, mlp=levers.neurons, heads=heads,
            offload=offload, offload_dir=offload_dir, spectra=spectra)

    if (auto and settings.size is not None and levers.neurons == "auto" and dense_heads is not None
            and neurons_need_full_width(adapter)):
        heads = auto_heads(dense_heads, hidden, lambda layout: widths_for(layout, batches=None))
    widths, rule, neurons = widths_for(heads)
    identity = (widths is not None and (neurons is not None or heads is not None)
                and all(w == hidden for w in widths))
    _refuse(heads is not None and not identity and any(b.heads and b.post_norm for b in adapter.branches),
            f"{adapter.family} attention writes through a branch-output norm: its heads are pruned only while the "
            "stream keeps its width (a --size that heads and neurons alone meet)")
    if not identity and neurons is not None and levers.compensate != "off" and "ridge" not in settings.overrides():
        levers = replace(levers, ridge=MIXED_RIDGE)  # neurons beside a sliced stream fit best with less pull
    if identity:
        _refuse_ignored_by_identity(settings)
        layout, tied, slice_head, fit, standard, deviations = NEURONS_ONLY, source_tied, True, False, True, []
    else:
        layout, standard = levers.rotation, uniform and settings.standard
    _refuse("allocation" in settings.overrides() and levers.allocation == "measured" and neurons is None,
            "--allocation measured shares the pruned MLP neurons among layers, and this run prunes none "
            "(--neurons off, or a size the stream or the heads meet alone)")
    counter = parameter_model(view.model, adapter, rotation="none" if identity else layout,
                              tied=bool(tied), source_tied=source_tied, slice_head=slice_head,
                              total=dense_parameters, heads=heads)
    predicted = counter.count(list(widths), neurons) if widths is not None else None
    _refuse(predicted is not None and neurons is None and heads is None and all(w == hidden for w in widths[:-1]),
            "nothing to cut: at this size every boundary keeps its full width "
            f"({hidden}, rounded to multiples of {levers.round_to}); choose a smaller --size")
    n_steps = len(get_path(view.model, adapter.layers)) * len(branch_groups(adapter.branches))
    return Plan(settings=settings, levers=levers, model=model, model_type=config.model_type, family=adapter.family,
                architecture=type(view.model).__name__, dtype=str(view.dtype).removeprefix("torch."), hidden=hidden,
                steps=n_steps, dense_parameters=dense_parameters,
                dense_neurons=getattr(config, adapter.config_neurons, None) if adapter.config_neurons else None,
                layout=layout, width_rule=rule, widths=tuple(widths) if widths is not None else None, neurons=neurons,
                slice_head=slice_head, keep_tied_head=keep, fit_tied_head=fit, tied_head=tied, standard=standard,
                deviations=tuple(deviations), predicted_parameters=predicted,
                budget=int(settings.size * dense_parameters) if settings.size is not None else None,
                heads=heads, dense_heads=dense_heads)


def parameter_counter(plan: Plan, view: LayeredModel, adapter: ModelAdapter):
    """The plan's parameter count as a function of its widths and neuron counts (`core.budget`)."""
    return parameter_model(view.model, adapter, rotation="none" if plan.identity else plan.layout,
                           tied=bool(plan.tied_head), source_tied=view.ties_head(adapter.head, adapter.embeddings[0]),
                           slice_head=plan.slice_head, total=plan.dense_parameters, heads=plan.heads)


def with_layer_neurons(plan: Plan, view: LayeredModel, adapter: ModelAdapter, curves) -> Plan:
    """The plan with each layer's MLP neurons shared by measured loss (`core.allocation`): as many
    parameters as equal counts free, at least; the predicted count follows."""
    counter = parameter_counter(plan, view, adapter)
    widths = list(plan.widths)
    counts = tuple(allocate_neurons(curves, plan.dense_neurons, plan.neurons, plan.levers.round_to,
                                    counter.neuron_costs(widths)))
    return replace(plan, layer_neurons=counts, predicted_parameters=counter.count(widths, counts))


def layout_name(heads: tuple[int, int] | None) -> str:
    return "all" if heads is None else f"{heads[0]}x{heads[1]}"


def head_choices(plan: Plan, view: LayeredModel, adapter: ModelAdapter) -> dict[tuple[int, int] | None, Plan]:
    """The plans `--heads auto` weighs by measured loss (`Plan.heads_by_loss`; else none): the plan as
    made, and one per layout with fewer whole key/value groups (each keeping the plan's query heads)
    whose plan also keeps the stream whole, its MLP neurons filling the rest of the size. Query heads
    within groups are not weighed: the probe prices them too cheaply (SmolLM2: it ranks 3x2 of 3x3
    with 2x3, measured 50.14 against 47.56 at 0.8 and 70.14 against 60.84 at 0.65)."""
    if not plan.heads_by_loss:
        return {}
    choices = {plan.heads: plan}
    per_group = (plan.heads or plan.dense_heads)[1]
    for layout in head_candidates(plan.dense_heads):
        if layout[1] != per_group or layout[0] >= (plan.heads or plan.dense_heads)[0]:
            continue
        try:
            candidate = make_plan(settings_from(plan.settings, heads=layout_name(layout)), view, adapter,
                                  model=plan.model, dense_parameters=plan.dense_parameters)
        except SliceGPTError:  # a layout the size cannot use (every neuron kept, or the stream sliced)
            continue
        if candidate.identity and candidate.neurons is not None and candidate.heads == layout:
            choices[layout] = replace(candidate, settings=plan.settings, levers=plan.levers)
    return choices


def choose_heads(choices: dict[tuple[int, int] | None, Plan], curves, head_costs, view: LayeredModel,
                 adapter: ModelAdapter) -> Plan:
    """Of the head layouts weighed, the one whose probe cost is least: its heads' cost (summed over
    layers, `head_costs[layer][layout]`) plus that of the MLP neurons its size leaves to prune, shared
    among layers by the same curves (`with_layer_neurons`). The layout of the plan as made wins ties."""
    weighed, best = {}, None
    for layout, candidate in choices.items():
        planned = with_layer_neurons(candidate, view, adapter, curves)
        cost = neuron_cost(curves, planned.layer_neurons, planned.dense_neurons)
        if layout is not None and layout != planned.dense_heads:
            cost += sum(layer[layout] for layer in head_costs)
        weighed[layout_name(layout)] = cost
        if best is None or cost < best[0]:
            best = (cost, planned)
    return replace(best[1], head_costs=weighed)


def with_widths(plan: Plan, widths: list[int]) -> Plan:
    """The plan once adaptive widths are chosen from the calibration spectra."""
    return replace(plan, widths=tuple(widths))


def effective_sparsity(widths, hidden: int) -> float:
    """1 - mean width / d over the boundaries the layers read."""
    return round(1.0 - sum(widths[:-1]) / ((len(widths) - 1) * hidden), 4)


def record(plan: Plan, outcome, *, calibration: dict, parameters_sliced: int, source_model: str,
           distributed: dict) -> SlicingConfig:
    """The run record saved in slicegpt.json, built one way for `slice_model` and `slice_and_save`."""
    lv, s = plan.levers, plan.settings
    widths = list(plan.widths)
    compensating = lv.compensate != "off"
    return SlicingConfig(
        sparsity=s.slicing if s.slicing is not None and plan.neurons is None else effective_sparsity(widths,
                                                                                                     plan.hidden),
        hidden_size=plan.hidden,
        sliced_hidden_size=widths[0] if plan.rotation == "uniform" else round(sum(widths[:-1]) / (len(widths) - 1)),
        model_type=plan.model_type, family=plan.family, rotation=plan.rotation, round_to=lv.round_to,
        slice_head=plan.slice_head, tied_head=outcome.tied_head, fit_tied_head=plan.fit_tied_head,
        pooling=lv.pooling if plan.rotation == "uniform" and not plan.identity else "",
        standard=plan.stock_class, deviations=list(plan.deviations),
        method=s.recipe, recipe=s.recipe, size=s.size, slicing=s.slicing, head=lv.head,
        compensate=lv.compensate, ridge=lv.ridge if compensating else None,
        dense_share=lv.dense_share if compensating else None, widths_rule=plan.width_rule,
        parameters_budget=s.size, widths=widths, mlp_width=lv.neurons, mlp_neurons=plan.neurons,
        mlp_neurons_dense=plan.dense_neurons if plan.neurons is not None else None,
        allocation=lv.allocation if plan.neurons is not None else None,
        mlp_neurons_per_layer=list(plan.layer_neurons) if plan.layer_neurons is not None else None, heads=lv.heads,
        attention_heads=list(plan.heads) if plan.heads is not None else None,
        attention_heads_dense=list(plan.dense_heads) if plan.heads is not None else None,
        compensation=summarize_fits(outcome.fits), calibration=calibration, source_model=source_model,
        parameters_dense=plan.dense_parameters, parameters_sliced=parameters_sliced, spectra=outcome.spectra,
        distributed=distributed, plan=plan.to_dict(), version=plan.version)


def summarize_fits(fits) -> dict:
    from slicegpt.core.compensation import summarize

    return summarize(fits)
