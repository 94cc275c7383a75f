"""Architecture descriptions: *where* the norms and linears of a decoder family live.

An adapter holds no algorithm. `invariance`, `slicing` and `calibration` read these
descriptions, so adding a family means writing one small description, not new math.
All names are attribute paths in the Hugging Face module tree (`q_proj`, `mlp.down_proj`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NormKind = Literal["rmsnorm", "layernorm"]
BranchKind = Literal["attention", "mlp"]


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder layer: ``x <- x + post_norm(module(norm(x)))``.

    `inputs` are the linears that read the (normalised) residual stream, so their
    columns are rotated; `outputs` write into it, so their rows are rotated.
    """

    name: str
    kind: BranchKind
    norm: str
    module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    post_norm: str | None = None

    @property
    def shortcut(self) -> str:
        """Attribute name of the skip-connection matrix this branch gets when sliced."""
        return f"{self.name}_shortcut"


@dataclass(frozen=True)
class ModelAdapter:
    """Description of one decoder family, chosen by `config.model_type`."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    head: str
    branches: tuple[Branch, ...]
    norm_kind: NormKind = "rmsnorm"
    # Gemma-style norms compute x * (offset + w); the fused "unit" gain is then w = 1 - offset.
    norm_offset: float = 0.0
    # Attribute holding a norm's epsilon (it is a plain float, not part of the state dict).
    norm_eps_attr: str = "variance_epsilon"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def structure(self) -> dict:
        """JSON-able layer structure, saved with a sliced model so it loads without adapters."""
        return {
            "layers": self.layers,
            "branches": [
                {"name": b.name, "kind": b.kind, "norm": b.norm, "module": b.module,
                 "post_norm": b.post_norm, "shortcut": b.shortcut}
                for b in self.branches
            ],
        }
