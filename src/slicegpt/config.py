"""The record of how a model was sliced, saved as JSON beside the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SlicingConfig:
    sparsity: float
    hidden_size: int
    sliced_hidden_size: int
    model_type: str
    family: str
    rotation: str = "per-layer"
    round_to: int = 8
    slice_head: bool = False
    tied_head: bool = False  # embeddings stay tied to the head and unsliced (an entry matrix instead)
    fit_tied_head: bool = False  # uniform: tied head kept with a fitted diagonal final-norm gain
    pooling: str = ""  # uniform: how the block boundaries were weighed
    standard: bool = False  # saved as the family's stock architecture (uniform rotation)
    deviations: list = field(default_factory=list)  # why the stock model is only approximate
    max_logit_deviation: float | None = None  # stock vs exact sliced model, 128 calibration tokens
    # Quality levers (README "Quality"); a record without them was sliced by the paper's algorithm.
    method: str = "paper"  # the recipe (kept under this name for records written before 0.2)
    recipe: str = ""  # 0.2: the recipe, its size (--size, a share of the dense parameters) or --slicing
    size: float | None = None
    slicing: float | None = None
    head: str = ""  # --head as resolved (auto, untied, sliced, fit)
    compensate: str = "off"  # "writers" (or "all": readers too) refitted against the dense model
    ridge: float | None = None  # compensation's relative regulariser
    dense_share: float | None = None  # compensation: share of the calibration batches the dense stream ran on
    widths_rule: str = "equal"  # "adaptive": each boundary its own width within the budget
    parameters_budget: float | None = None  # --size: fraction of the dense count asked for
    widths: list = field(default_factory=list)  # one width per block boundary
    mlp_width: float | str | None = None  # --neurons as resolved ("auto", a fraction, None: not pruned)
    mlp_neurons: int | None = None  # MLP neurons kept per layer (None: all)
    mlp_neurons_dense: int | None = None
    allocation: str | None = None  # --allocation as resolved ("equal", "measured"; None: no neuron pruned)
    mlp_neurons_per_layer: list | None = None  # measured allocation: each layer's count (their mean: mlp_neurons)
    heads: float | str | None = None  # --heads as resolved (a fraction, "GxR", None: not pruned)
    attention_heads: list | None = None  # [key/value heads, query heads per key/value head] kept per layer
    attention_heads_dense: list | None = None
    compensation: dict = field(default_factory=dict)  # summed calibration errors, paper's weights vs fitted
    calibration: dict = field(default_factory=dict)  # source, samples, seqlen, seed, tokens
    source_model: str = ""
    parameters_dense: int = 0
    parameters_sliced: int = 0
    distributed: dict = field(default_factory=dict)  # world_size, samples and tokens per rank
    plan: dict = field(default_factory=dict)  # every decision of the run (slicegpt.plan.Plan.to_dict)
    version: str = ""  # the slicegpt that made the model
    finetune: list = field(default_factory=list)  # one record per recovery fine-tuning run (finetune.py)
    # Eigenvalues per boundary (for reports); kept in memory, not in the JSON record.
    spectra: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("spectra")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SlicingConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "spectra"}
        return cls(**known)
