"""Weight compensation: refit a step's weights after the cut so it reproduces the dense model.

Slicing a boundary loses the discarded directions, and the paper's model passes that loss on:
each later step sees a little less of what the dense model saw. Compensation refits, per step,

- the *readers*: the map from the sliced normalised input u (k wide) to the dense one n
  (d wide) that the paper takes to be Q^T; the least-squares map also undoes what the earlier
  cuts and refits changed in the stream, and
- the *writers*: the branch outputs, so that skip + branch lands on the dense model's stream
  after the step (``A W ≈ h_dense - z Q^T``) instead of adding only the branch's own part,

on the sliced model's actual inputs against the dense model's outputs for the same tokens.
Both are ridge regressions *toward the paper's weights* P:

    W = argmin ||X W - Y||^2 + lam ||W - P||^2 = (X^T X + lam I)^-1 (X^T Y + lam P),
    lam = ridge * trace(X^T X) / n_inputs,

so a fit never has a larger calibration error than P (P is a candidate), and where P is
already exact (sparsity 0) the fit returns P. Statistics are float64 sums over tokens that
merge (a stream of batches, or shares from several processes), like `bases.Covariance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 0.1  # default relative regulariser: SmolLM2 25% held-out ppl 54.9 / 53.6 / 51.4 / 50.1 / 50.9 at 1e-4 ... 1


class LeastSquares:
    """Running X^T X, X^T Y and sum |Y|^2 of a linear fit X W ≈ Y over calibration tokens."""

    def __init__(self, n_in: int, n_out: int, device: torch.device | str = "cpu") -> None:
        self.xx = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.xy = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.tokens = 0

    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if mask is not None:
            keep = mask.reshape(-1).bool()
            x, y = x[keep], y[keep]
        x, y = x.to(torch.float64), y.to(torch.float64)
        self.xx.addmm_(x.T, x)
        self.xy.addmm_(x.T, y)
        self.yy += float(y.pow(2).sum())
        self.tokens += x.shape[0]

    def merge(self, other: "LeastSquares") -> "LeastSquares":
        self.xx += other.xx.to(self.xx.device)
        self.xy += other.xy.to(self.xy.device)
        self.yy += other.yy
        self.tokens += other.tokens
        return self

    def error(self, w: torch.Tensor) -> float:
        """Mean squared error per token of X W against Y on the tokens seen."""
        total = (w * (self.xx @ w)).sum() - 2 * (w * self.xy).sum() + self.yy
        return float(total.clamp_min(0)) / max(self.tokens, 1)

    def solve(self, prior: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
        """The ridge fit toward `prior` ([n_in, n_out], float64)."""
        n = self.xx.shape[0]
        lam = ridge * float(self.xx.diagonal().sum()) / n
        if lam <= 0:  # no signal at all: keep the prior
            return prior.clone()
        a = self.xx + lam * torch.eye(n, dtype=torch.float64, device=self.xx.device)
        b = self.xy + lam * prior
        try:
            chol = torch.linalg.cholesky(a)
            return torch.cholesky_solve(b, chol)
        except RuntimeError:  # not numerically positive definite: a least-squares solve instead
            return torch.linalg.lstsq(a, b).solution


@dataclass
class FitRecord:
    """What one fit did, per token: the calibration error of the paper's weights and of the fit."""

    step: int
    part: str  # "readers:<norm>" or "writers"
    error_paper: float
    error_fitted: float

    def to_dict(self) -> dict:
        return {"step": self.step, "part": self.part, "error_paper": self.error_paper,
                "error_fitted": self.error_fitted}


def summarize(fits: list[FitRecord]) -> dict:
    """Summed per-token calibration errors, readers and writers apart (recorded in slicegpt.json)."""
    if not fits:
        return {}
    out: dict = {"fits": len(fits)}
    for part in ("readers", "writers"):
        chosen = [f for f in fits if f.part.startswith(part)]
        out[part] = {"error_paper": sum(f.error_paper for f in chosen),
                     "error_fitted": sum(f.error_fitted for f in chosen)}
    return out
