"""Statistics of the residual signal, and the bases chosen from them.

Accumulated in float64: the paper's ablation shows float32 accumulation loses quality,
because residual streams carry a few huge coordinates next to many small ones.
"""

from __future__ import annotations

import math

import torch

from slicegpt.core.distributed import Ranks
from slicegpt.errors import SliceGPTError


def ordered_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors as columns, each column's largest entry positive.

    An eigenvector is defined only up to its sign, and LAPACK may return either for matrices
    that differ in the last bit (sums added in another order, as across processes). Fixing the
    sign makes the basis a function of the matrix, so runs that agree on the statistics agree on
    the weights, not just on the outputs. (Negating a column changes no product's magnitude, so
    outputs do not move at all.)
    """
    values, vectors = torch.linalg.eigh(matrix)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    pivot = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(vectors.gather(0, pivot))
    signs[signs == 0] = 1
    return values, vectors * signs


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
        return ordered_eigh(self.matrix / self.tokens)

    def reduce(self, ranks: Ranks) -> "Covariance":
        """The sums over every rank's share of the tokens (a no-op in one process)."""
        ranks.sum_(self.matrix)
        self.tokens = int(ranks.sum_number(self.tokens))
        return self

    def merge(self, other: "Covariance") -> "Covariance":
        """Add another share of the calibration tokens (a sum: shares from other processes add up)."""
        self.matrix += other.matrix.to(self.matrix.device)
        self.tokens += other.tokens
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that restore this running sum exactly (resume, or a reduction across processes)."""
        return {"matrix": self.matrix, "tokens": torch.tensor([self.tokens], dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> "Covariance":
        cov = cls(state["matrix"].shape[0], device)
        cov.matrix.copy_(state["matrix"])
        cov.tokens = int(state["tokens"][0])
        return cov


def sliced_dim(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    """d' = (1 - sparsity) * d, rounded down to a multiple of `round_to` (at least `round_to`)."""
    if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise SliceGPTError(f"sparsity must be in [0, 1), got {sparsity}")
    if round_to < 1:
        raise SliceGPTError(f"round_to must be a positive integer, got {round_to}")
    dim = int((1.0 - sparsity) * hidden_size // round_to) * round_to
    return min(hidden_size, max(dim, round_to))


def zero_mean_basis(cov: torch.Tensor, dim: int) -> torch.Tensor:
    """A d x k basis for a zero-mean stream whose k coordinates also sum to zero.

    A stock LayerNorm on the sliced stream subtracts the mean of the k kept coordinates,
    z 1_k / k = x (Q 1_k) / k. Taking the top k-1 principal directions (all orthogonal to
    1_d) plus the signal-free direction 1_d / sqrt(d), and turning that basis with the
    Householder reflection that sends 1_k / sqrt(k) to its last axis, gives Q 1_k ∝ 1_d,
    so every zero-mean x has z 1_k = 0 and the LayerNorm subtracts exactly nothing.
    """
    d = cov.shape[0]
    ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64, device=cov.device)
    centering = torch.eye(d, dtype=torch.float64, device=cov.device) - ones @ ones.T
    top = ordered_eigh(centering @ cov @ centering)[1][:, :dim - 1]
    basis, r = torch.linalg.qr(torch.cat([ones, top], dim=1))  # exact orthogonality, ones first
    basis = basis * torch.sign(torch.diagonal(r))
    basis = torch.cat([basis[:, 1:], basis[:, :1]], dim=1)
    v = torch.full((dim,), dim ** -0.5, dtype=torch.float64, device=cov.device)
    v[-1] -= 1.0
    if dim > 1:
        householder = torch.eye(dim, dtype=torch.float64, device=cov.device) - 2 * torch.outer(v, v) / (v @ v)
        basis = basis @ householder
    return basis


def fit_diagonal_gain(q: torch.Tensor, gain: torch.Tensor, normed_cov: torch.Tensor,
                       embeddings: torch.Tensor) -> torch.Tensor:
    """The diagonal D (in the rotated basis) whose tied-head logits best match the exact ones.

    Exact logits are n diag(g) E^T for the normalised final stream n = u Q^T; tied, they are
    u D (E Q)^T. Minimising E||u (Q^T diag(g) - D Q^T) E^T||^2 over diagonal D is a k x k linear
    system with C = Q^T Cov(n) Q and K = Q^T E^T E Q: (C o K^T) d = diag(C Q^T diag(g) E^T E Q).
    """
    e = embeddings.detach()
    gram = torch.zeros(e.shape[1], e.shape[1], dtype=torch.float64, device=q.device)
    for i in range(0, e.shape[0], 4096):
        block = e[i:i + 4096].to(torch.float64)
        gram.addmm_(block.T, block)
    c = q.T @ normed_cov @ q
    k = q.T @ gram @ q
    a = c * k.T
    b = torch.diagonal(c @ (q.T * gain[None, :]) @ gram @ q)
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
