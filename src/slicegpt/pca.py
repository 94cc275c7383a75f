"""Covariance of the residual signal and its principal directions.

Accumulated in float64: the paper's ablation shows float32 accumulation loses quality,
because residual streams carry a few huge coordinates next to many small ones.
"""

from __future__ import annotations

import torch


class Covariance:
    """Running X^T X over calibration tokens, padding excluded."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of `x` ([..., dim]); `mask` ([...], 1 = real token) drops padding."""
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        x = x.to(torch.float64)
        self.matrix.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, per token) and the matching orthonormal eigenvectors as columns."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen")
        values, vectors = torch.linalg.eigh(self.matrix / self.tokens)
        order = torch.argsort(values, descending=True)
        return values[order], vectors[:, order]
