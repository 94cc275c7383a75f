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

The same statistics price an MLP's neurons (`prune`): they are the inputs of its down
projection's fit, so dropping some and refitting the rest is a least-squares question too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from slicegpt.core.distributed import Ranks
from slicegpt.errors import SliceGPTError

# the share of the calibration windows the dense model runs on. SmolLM2 at 25%, held-out perplexity /
# slicing time over the dense floor: 1: 46.92 / 2.83x, 0.5: 47.47 / 2.36x, 0.25: 47.86 / 1.97x,
# 0.125: 48.32 / 1.59x, 0: 49.40 / 1.49x (README "Quality"; issue 12's limit is 2x)
DENSE_SHARE = 0.125
# MLP neurons the OBS search removes a step (`_search`): it reads W and H^-1 once per step. Chosen one by
# one among the cheapest, they are the neurons one a step removes (SmolLM2 at 0.8, every golden case);
# the k cheapest by their scores alone gave 44.138 held-out perplexity at 0.8 against 44.137.
OBS_BLOCK = 8
RIDGE = 0.1  # default relative regulariser: SmolLM2 25% held-out ppl 54.9 / 53.6 / 51.4 / 50.1 / 50.9 at 1e-4 ... 1
# the default recipe's where MLP neurons are pruned beside a sliced stream (unless --ridge is given): the fits
# there start further from their priors. SmolLM2 at 0.5: 79.77 against 81.15 at 0.1 (84.41 / 84.99 with equal
# widths), at 0.6: 68.50 against 68.86; where neurons alone meet the size (0.8) 0.1 is best.
MIXED_RIDGE = 0.03


def check_dense_share(share: float) -> None:
    if not 0 <= share <= 1:  # (NaN too)
        raise SliceGPTError(f"dense share must be in [0, 1], got {share}")


def dense_first_batches(windows, batch_size: int, ranks: Ranks, dense_share: float = 1.0
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """This rank's calibration batches, those the dense model runs on first, and how many they are.

    The dense windows are the first ceil(dense_share * n) of all n windows (`data.Windows`),
    rounded up to whole batches, whichever rank holds them, so the model is the same for any
    number of processes. None: every batch (dense_share 1)."""
    check_dense_share(dense_share)
    mine = ranks.share(len(windows))
    if dense_share >= 1:
        return windows.select(mine).batches(batch_size), None
    k = min(len(windows), -(-math.ceil(dense_share * len(windows)) // batch_size) * batch_size)
    first, rest = [i for i in mine if i < k], [i for i in mine if i >= k]
    dense = windows.select(first).batches(batch_size) if first else []
    return dense + (windows.select(rest).batches(batch_size) if rest else []), len(dense)


def _add_upper_gram(acc: torch.Tensor, x: torch.Tensor, band: int = 256) -> None:
    """acc += x^T x on and above the diagonal only, a band of rows at a time (about 60% of a full
    product's work for an MLP's width; the lower triangle is not touched)."""
    n = x.shape[1]
    bands = -(-n // band)
    edges = [n * i // bands for i in range(bands + 1)]
    for start, stop in zip(edges, edges[1:]):
        acc[start:stop, start:] += x[:, start:stop].T @ x[:, start:]


def _fill_lower(m: torch.Tensor, block: int = 1024) -> None:
    """Copy the strict upper triangle of `m` onto the lower one, in place, a band of rows at a time."""
    n = m.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        m[stop:, start:stop] = m[start:stop, stop:].T  # below the band <- right of the band
        band = m[start:stop, start:stop]
        band.copy_(band.triu() + band.triu(1).T)


class LeastSquares:
    """Running X^T X, X^T Y and sum |Y|^2 of a linear fit X W ≈ Y over calibration tokens.

    The sums are float64. One batch's products are taken in float32 unless the model computes
    in float64: the Gram of an MLP's inputs is the largest product of compensation, float32
    runs it at twice the speed, and on SmolLM2 (25%, the default) the held-out perplexity is
    the same to four digits (41.970 both ways). Only the Gram's upper triangle is summed
    (`_add_upper_gram`); the lower one is filled in when the sums are first read.

    With a `prior` P, batches may also come without targets (`update(x)`, after every batch
    with targets): their target is X P, the prior's own output on them. That is how the dense
    model's stream can be run on a share of the calibration windows only (`dense_share`): the
    other windows still shape the Gram, so the fit and the neurons it prunes see every token,
    at the cost of the Gram alone."""

    def __init__(self, n_in: int, n_out: int, device: torch.device | str = "cpu",
                 prior: torch.Tensor | None = None) -> None:
        self._xx = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self._upper_only = False  # whether _xx holds only the upper triangle of the sums so far
        self.xy = torch.zeros(n_in, n_out, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.tokens = 0
        self.prior = prior
        # with a prior: "targets" (batches with targets so far), "residual" (xy, yy hold the target
        # batches' X^T (Y - X P) and |Y - X P|^2: later batches add only to the Gram), "complete"
        self._state = "targets"

    @property
    def xx(self) -> torch.Tensor | None:
        """X^T X (float64, symmetric)."""
        if self._upper_only:
            _fill_lower(self._xx)
            self._upper_only = False
        return self._xx

    @xx.setter
    def xx(self, value: torch.Tensor | None) -> None:
        self._xx, self._upper_only = value, False

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        """Add a batch: inputs `x` with targets `y`, or (with a prior, after every target batch) inputs alone."""
        if self._state == "complete":
            raise SliceGPTError("internal error: a least-squares fit was updated after it was read")
        if y is None:
            if self.prior is None:
                raise SliceGPTError("internal error: a least-squares batch without targets needs a prior")
            if self._state == "targets":
                self._shift_targets(-1)
        elif self._state != "targets":
            raise SliceGPTError("internal error: a least-squares batch with targets after one without")
        x = x.reshape(-1, x.shape[-1])
        y = y.reshape(x.shape[0], y.shape[-1]) if y is not None else None  # (a fit without outputs too)
        if mask is not None and not bool(mask.all()):  # (calibration windows are usually full)
            keep = mask.reshape(-1).bool()
            x, y = x[keep], (y[keep] if y is not None else None)
        if x.dtype == torch.float64:  # a float64 model: products in float64 too
            self.xx.addmm_(x.T, x)
            if y is not None:
                self.xy.addmm_(x.T, y.to(torch.float64))
        else:  # one batch's products in float32 (what the model computed in), summed in float64
            x = x.to(torch.float32)
            _add_upper_gram(self._xx, x)  # the lower triangle goes stale until `xx` is read
            self._upper_only = True
            if y is not None:
                y = y.to(torch.float32)
                self.xy += x.T @ y
        if y is not None:
            self.yy += float(y.to(torch.float64).pow(2).sum())
        self.tokens += x.shape[0]

    def _shift_targets(self, sign: int) -> None:
        """Sums against Y + sign X P instead of Y: sign -1 makes them residuals of the prior (so that
        batches whose target is X P add nothing to them), +1 turns residuals back into targets."""
        if self.tokens == 0:  # nothing summed yet: both forms are the same zeros
            self._state = "residual" if sign < 0 else "complete"
            return
        p = self.prior.to(self._xx.device)
        xx, total = self.xx, 0.0
        for cols in _column_chunks(p):  # (X^T X P a few columns at a time: no n x d temporary)
            xxp = xx @ p[:, cols].to(xx.dtype)
            total += _dot(p[:, cols], xxp) + 2 * sign * _dot(p[:, cols], self.xy[:, cols])
            self.xy[:, cols].add_(xxp, alpha=sign)
        self.yy += total
        self._state = "residual" if sign < 0 else "complete"

    def _complete(self) -> None:
        """Back to plain sums against the targets: X^T Y = X^T X P + X^T (Y - X P)."""
        if self.prior is None or self._state == "complete":
            return
        if self._state == "targets":
            self._shift_targets(-1)
        self._shift_targets(+1)

    def merge(self, other: "LeastSquares") -> "LeastSquares":
        self._complete()
        other._complete()
        self.xx += other.xx.to(self.xx.device)
        self.xy += other.xy.to(self.xy.device)
        self.yy += other.yy
        self.tokens += other.tokens
        return self

    def reduce(self, ranks: Ranks) -> "LeastSquares":
        """The sums over every rank's share of the tokens (a no-op in one process)."""
        if self.prior is not None and self._state == "targets":
            self._shift_targets(-1)  # every rank in the same form: a rank may have had target batches only
        ranks.sum_(self.xx, self.xy)
        self.yy = ranks.sum_number(self.yy)
        self.tokens = int(ranks.sum_number(self.tokens))
        self._complete()
        return self

    def error(self, w: torch.Tensor) -> float:
        """Mean squared error per token of X W against Y on the tokens seen."""
        self._complete()
        total = _quadratic(self.xx, w) - 2 * _dot(w, self.xy) + self.yy
        return max(total, 0.0) / max(self.tokens, 1)

    def solve(self, prior: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, float, float]:
        """The ridge fit toward `prior` ([n_in, n_out]; any float dtype, read in float64), with the per-token
        calibration errors of the prior and of the fit. Consumes the statistics: they are changed in place,
        so a wide fit (an MLP's down projection) needs one n x n matrix beyond them, not three."""
        error_prior = self.error(prior)
        n = self.xx.shape[0]
        lam = ridge * float(self.xx.diagonal().sum()) / n
        if lam <= 0:  # no signal at all: keep the prior
            return prior.clone(), error_prior, error_prior
        self.xy.add_(prior, alpha=lam)  # b = X^T Y + lam P
        w, error_fit = _ridge_solution(self.xx, self.xy, prior, lam, lam, self.yy, self.tokens,
                                       "compensation's least-squares fit has non-finite statistics; "
                                       "try --compensate off or a larger --ridge")
        self.xx = self.xy = None
        return w, error_prior, error_fit


def _column_chunks(m: torch.Tensor, width: int = 256) -> list[slice]:
    """Column slices of `m`, so that a product with an n x n matrix is taken a few columns at a time."""
    return [slice(start, start + width) for start in range(0, m.shape[1], width)]


def _dot(a: torch.Tensor, b: torch.Tensor, b_rows: torch.Tensor | None = None, rows: int = 256) -> float:
    """sum(a * b) (or sum(a * b[b_rows])) for matrices of any layout, a few rows at a time: no a-sized
    temporary."""
    return float(sum((a[i:i + rows] * (b[i:i + rows] if b_rows is None else b[b_rows[i:i + rows]])).sum()
                     for i in range(0, a.shape[0], rows)))


def _quadratic(xx: torch.Tensor, w: torch.Tensor) -> float:
    """tr(W^T X^T X W), a few columns of W at a time."""
    return float(sum(_dot(w[:, cols], xx @ w[:, cols].to(xx.dtype)) for cols in _column_chunks(w)))


def _factor(h: torch.Tensor, shift: float) -> bool:
    """Factorise h + shift I by Cholesky in place (h's lower triangle becomes the factor L, its strict upper
    triangle zeros); whether that worked. LAPACK works on column-major matrices: handed h, torch would
    factor a copy (one more n x n matrix); h^T is the same symmetric matrix column-major, and its upper
    factor L^T is written where h lies."""
    h.diagonal().add_(shift)
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h.mT, upper=True, out=(h.mT, info))
    return int(info) == 0


def _cholesky_solve(factor: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 b from `_factor`'s L, into one new matrix (torch.cholesky_solve copies the factor too)."""
    y = torch.linalg.solve_triangular(factor, b, upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True, out=y)


def _take_rows(m: torch.Tensor, kept: torch.Tensor, block: int = 128) -> torch.Tensor:
    """m[kept] for ascending `kept`, within m's own storage (its first rows; m is consumed). A block of
    rows is read before it is written over rows r >= its first: kept[r] >= r, so no row still to be
    read is overwritten."""
    for r in range(0, len(kept), block):
        rows = m[kept[r:r + block]]
        m[r:r + len(rows)] = rows
    return m[:len(kept)]


def _take(m: torch.Tensor, kept: torch.Tensor, block: int = 128) -> torch.Tensor:
    """m[kept][:, kept] for a contiguous square `m` and ascending `kept`, in m's own storage (a view of its
    first k*k entries; m is consumed): gathering a k x k matrix beside an n x n one would hold both.
    Rows r to r + block - 1 are read, then written over entries r*k onwards, which end before row
    kept[r + block] starts, so no row still to be read is overwritten."""
    k = len(kept)
    flat = m.view(-1)
    for r in range(0, k, block):
        rows = m[kept[r:r + block, None], kept]
        flat[r * k:r * k + rows.numel()] = rows.reshape(-1)
    return flat[:k * k].view(k, k)


def _ridge_solution(xx: torch.Tensor, b: torch.Tensor, prior: torch.Tensor, shift: float, lam: float, yy: float,
                    tokens: int, failure: str, prior_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """W solving (X^T X + shift I) W = b, b = X^T Y + lam P, with its per-token calibration error
    against the sums (P: `prior`, or its rows `prior_rows`). `xx` (X^T X) is factorised in place; `failure` is
    the error if it cannot be."""
    if not _factor(xx, shift):
        raise SliceGPTError(failure)
    w = _cholesky_solve(xx, b)
    # the error from w^T (X^T X + shift I) w = w . b and X^T Y = b - lam P
    wb = _dot(w, b)
    total = wb - shift * _dot(w, w) - 2 * (wb - lam * _dot(w, prior, prior_rows)) + yy
    return w, max(total, 0.0) / max(tokens, 1)


def _inverse(xx: torch.Tensor, shift: float, dtype: torch.dtype) -> torch.Tensor | None:
    """(xx + shift I)^-1 in `dtype` by Cholesky, or None if that fails."""
    h = xx.to(dtype, copy=True)
    if not _factor(h, shift) or not bool(torch.isfinite(h.diagonal()).all()):
        return None
    torch.cholesky_inverse(h.mT, upper=True, out=h.mT)  # in place, as `_factor`: no second n x n matrix
    return h  # (symmetric: h and h^T are the same inverse)


# A Gram summed from float32 products can be indefinite by their rounding where neurons are near-copies of
# each other: such a search's shift grows tenfold at a time, in float64, up to this share of the mean
# diagonal (the default ridge is 0.1), before the run gives up (`_searchable_inverse`).
SHIFT_LIMIT = 1e-2


def _searchable_inverse(xx: torch.Tensor, shift: float, work: torch.dtype, failure: str
                        ) -> tuple[torch.Tensor, float]:
    """(xx + s I)^-1 and the shift s it took: `shift` in `work`, else in float64, else a shift grown tenfold
    at a time up to SHIFT_LIMIT of the mean diagonal (in float64); `failure` is the error if none factors.

    With 1000 tokens of inputs whose scales span 1 to 1000 and 30 near-copied pairs, float32 products
    left the summed Gram's least eigenvalue at -161 where the float64 one is 0, below a tiny ridge's
    shift of 21: the search stopped. Ten times that shift factors in float64."""
    hinv = _inverse(xx, shift, work)
    if hinv is None and work != torch.float64:  # too ill-conditioned for `work`
        hinv = _inverse(xx, shift, torch.float64)
    limit = SHIFT_LIMIT * float(xx.diagonal().mean())
    while hinv is None and shift * 10 <= limit:
        shift *= 10
        hinv = _inverse(xx, shift, torch.float64)
    if hinv is None:
        raise SliceGPTError(failure)
    return hinv, shift


POOL = 4  # a search step picks its rows among POOL x block candidates, the cheapest one by one


def _greedy(hinv: torch.Tensor, w: torch.Tensor, k: int) -> list[int]:
    """The k rows that greedy OBS removes from a small problem (H^-1 and W of a pool of rows), in order.

    Works on the pool's Gram G = W W^T instead of W: a row's score is G_jj / [H^-1]_jj, and
    removing row j (W <- W - c w_j^T, c = H^-1_{:j} / H^-1_jj) is G <- G - c g_j^T - g_j c^T + G_jj c c^T,
    so every step is pool x pool however wide W is."""
    g = w @ w.T
    alive = torch.ones(len(w), dtype=torch.bool, device=w.device)
    inf = torch.tensor(torch.inf, dtype=w.dtype, device=w.device)
    chosen = []
    for _ in range(k):
        j = int(torch.where(alive, g.diagonal() / hinv.diagonal().clamp_min(1e-300), inf).argmin())
        column = hinv[:, j] / hinv[j, j].clamp_min(1e-300)
        gj = g[:, j].clone()
        g = g - torch.outer(column, gj) - torch.outer(gj, column) + gj[j] * torch.outer(column, column)
        hinv = hinv - torch.outer(column, hinv[j])
        alive[j] = False
        chosen.append(j)
    return chosen


def _ridge(xx: torch.Tensor, ridge: float) -> tuple[float, float]:
    """lam = ridge x the mean of X^T X's diagonal, and the shift the inverse takes (lam, or a floor)."""
    lam = ridge * float(xx.diagonal().sum()) / xx.shape[0]
    return lam, max(lam, 1e-12 * float(xx.diagonal().abs().max().clamp_min(1.0)))


def _search(xx: torch.Tensor, shift: float, rows: range, keep: int, block: int, work: torch.dtype, failure: str,
            b: torch.Tensor | None = None, w: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float], float]:
    """Greedy structured OBS down to `keep` of `rows`, `block` rows a step (see `prune`).

    Each step takes `block` rows, chosen row by row (each choice refitting the others) among the
    `POOL` x `block` that cost least one by one, charges them their exact joint cost
    ``tr(W_B^T [H^-1]_BB^-1 W_B)`` (spread evenly over the block) and refits the rest: a
    rank-|B| update of W and of H^-1, in place (one n x n matrix beyond the sums). Once a quarter of
    the rows are gone they are dropped from both, H^-1 within its own storage (what is left of it is
    the inverse of the kept rows' H), so later steps read less. The fit starts from
    (X^T X + shift I)^-1 `b` (b = X^T Y + lam P), or from `w` where it is known. Returns the mask
    of the rows kept (all of those outside `rows` too), each removal's cost (the error it adds
    summed over the tokens) and the shift the inverse took (`_searchable_inverse`)."""
    n = xx.shape[0]
    kept = torch.ones(n, dtype=torch.bool, device=xx.device)
    costs: list[float] = []
    removals = len(rows) - keep
    if removals <= 0:
        return kept, costs, shift
    hinv, shift = _searchable_inverse(xx, shift, work, failure)
    if w is None:  # (H^-1 b a few columns at a time: no converted copy of b)
        w = torch.empty(b.shape, dtype=work, device=hinv.device)
        for cols in _column_chunks(b):
            w[:, cols] = hinv @ b[:, cols].to(hinv.dtype)
    else:
        w = w.to(device=hinv.device, dtype=work, copy=True)
    hinv = hinv.to(work)
    ids = torch.arange(n, device=w.device)  # the original index of each row still held
    candidate = torch.zeros(n, dtype=torch.bool, device=w.device)
    candidate[rows.start:rows.stop] = True
    gone = torch.zeros_like(candidate)
    inf = torch.tensor(torch.inf, dtype=work, device=w.device)
    tiny = torch.finfo(work).tiny
    held, dropped, t = n, 0, 0
    while t < removals:
        if 4 * dropped >= held:  # drop the removed rows
            stay = (~gone).nonzero().flatten()
            hinv, w, ids, candidate = _take(hinv, stay), w[stay], ids[stay], candidate[stay]
            gone = torch.zeros_like(candidate)
            held, dropped = len(ids), 0
        k = min(block, removals - t)
        # (a diagonal that rounding took to or below zero: that row is not priced as free)
        norms = torch.linalg.vector_norm(w, dim=1).square()  # (no n x d temporary, unlike w.pow(2))
        scores = torch.where(candidate, norms / hinv.diagonal().clamp_min(tiny), inf)
        if k == 1:
            index = scores.argmin().reshape(1)
        else:  # the block, row by row among the cheapest few (two copies of a neuron are not both cheap)
            pool = torch.topk(scores, min(POOL * k, int(candidate.sum())), largest=False).indices
            # (a small problem: on the CPU, where its many tiny steps cost no device round trips)
            chosen = _greedy(hinv[pool[:, None], pool].to("cpu", torch.float64), w[pool].to("cpu", torch.float64), k)
            index = pool[torch.tensor(chosen, device=pool.device)]
        rows_b = hinv[index]  # (a copy)
        factor, info = torch.linalg.cholesky_ex(rows_b[:, index].to(torch.float64))
        if int(info) != 0:
            raise SliceGPTError(failure)
        wb = w[index].to(torch.float64)
        costs.extend([float(torch.linalg.solve_triangular(factor, wb, upper=False).pow(2).sum()) / k] * k)
        w.addmm_(rows_b.T, torch.cholesky_solve(wb, factor).to(work), alpha=-1.0)
        v = torch.linalg.solve_triangular(factor, rows_b.to(torch.float64), upper=False).to(work)
        hinv.addmm_(v.T, v, alpha=-1.0)  # H^-1 - H^-1_{:B} [H^-1_BB]^-1 H^-1_{B:}
        w[index] = 0.0
        candidate[index] = False
        gone[index] = True
        kept[ids[index]] = False
        dropped += k
        t += k
    return kept, costs, shift


def prune(fit: LeastSquares, prior: torch.Tensor, ridge: float, rows: range, keep: int,
          work: torch.dtype = torch.float64, costs: list[float] | None = None, block: int = OBS_BLOCK
          ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The ridge fit with all but `keep` of `rows` removed (structured OBS); `fit` must be summed over
    ranks, and is consumed (its sums are changed and released).

    Removing input j of a least-squares fit and refitting the others costs
    ``|W_j|^2 / [H^-1]_jj`` (H = X^T X + lam I, shared by every output column), and the
    refit is a rank-one update of W and H^-1 (Optimal Brain Surgeon, one row at a time as in
    ZipLM; `block` rows a step, `_search`). An MLP's neurons are the rows of its down projection:
    the cheapest go first, and the rest absorb what they carried. The greedy search runs in `work`
    (float32 for a float32 model: it only ranks the rows, at half the cost); the kept rows' fit is
    then solved afresh in float64 from the sums, the exact ridge fit on them. Returns that fit, the
    kept indices (in order) and the calibration errors of the prior (all rows) and of the pruned
    fit. `costs` (a list) receives each removal's cost in turn, the error it adds summed over the
    tokens (a step's joint cost shared evenly by its rows).
    """
    error_prior = fit.error(prior)
    failure = ("pruning MLP neurons: the least-squares statistics are not finite or not positive definite; "
               "try a larger --ridge")
    lam, shift = _ridge(fit.xx, ridge)
    xx, b = fit.xx, fit.xy.add_(prior, alpha=lam)  # b = X^T Y + lam P, formed in place
    fit.xx = fit.xy = None  # consumed (as `LeastSquares.solve`): each n x n matrix is freed once read
    alive, searched, shift = _search(xx, shift, rows, keep, block, work, failure, b=b)
    if costs is not None:
        costs.extend(searched)
    kept = alive.nonzero().flatten()
    # the exact ridge fit of the kept rows: H_KK W = b_K, H = X^T X + shift I (H_KK and b_K gathered in place)
    xx = _take(xx, kept)
    w, error_fit = _ridge_solution(xx, _take_rows(b, kept), prior, shift, lam, fit.yy, fit.tokens, failure, kept)
    return w, kept, error_prior, error_fit


def removal_costs(xx: torch.Tensor, weights: torch.Tensor, ridge: float, rows: range, keep: int,
                  block: int = OBS_BLOCK, work: torch.dtype = torch.float32) -> list[float]:
    """What removing all but `keep` of `rows` from a linear's own weights costs, one removal after
    another, `block` rows a step (`prune`'s search without its fit), on the Gram `xx` of its inputs
    (summed over ranks). `weights` ([inputs, outputs]) are the ridge fit of their own outputs, so no
    X^T Y is needed: the sums are one n x n matrix. A block a step reads W and H^-1 once per block
    instead of once per row: that makes pricing every layer's neurons down to a floor affordable
    (`allocation.probe_neuron_costs`)."""
    return _search(xx, _ridge(xx, ridge)[1], rows, keep, block, work, "pricing MLP neurons: the least-squares "
                   "statistics are not finite or not positive definite; try a larger --ridge", w=weights)[1]


def _head_search(hinv: torch.Tensor, w: torch.Tensor, rows: range, head_dim: int, groups: int,
                 keep: tuple[int, int]) -> tuple[list[int], float]:
    """Greedy block OBS over attention heads down to `keep` (see `prune_heads`), on H^-1 and the fit W
    (changed in place of neither: the updates make new tensors). Returns the kept heads (indices
    within `rows`, in order) and the summed cost of the removals (the error they add over the tokens)."""
    per_group = len(rows) // head_dim // groups
    alive = {g: list(range(g * per_group, (g + 1) * per_group)) for g in range(groups)}
    total = 0.0

    def block(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(rows.start + h * head_dim, rows.start + (h + 1) * head_dim)
                          for h in heads]).to(w.device)

    def cost(index: torch.Tensor) -> float:
        return float((w[index] * torch.linalg.solve(hinv[index][:, index], w[index])).sum())

    def remove(index: torch.Tensor) -> None:
        nonlocal w, hinv, total
        total += cost(index)
        column = hinv[:, index]
        inverse = torch.linalg.inv(hinv[index][:, index])
        w = w - column @ (inverse @ w[index])
        hinv = hinv - column @ inverse @ column.T
        w[index] = 0.0

    while len(alive) > keep[0]:
        group = min(alive, key=lambda g: cost(block(alive[g])))
        remove(block(alive.pop(group)))
    while any(len(heads) > keep[1] for heads in alive.values()):
        group, head = min(((g, h) for g, heads in alive.items() if len(heads) > keep[1] for h in heads),
                          key=lambda gh: cost(block([gh[1]])))
        alive[group].remove(head)
        remove(block([head]))
    return sorted(h for heads in alive.values() for h in heads), total


def prune_heads(fit: LeastSquares, prior: torch.Tensor, ridge: float, rows: range, head_dim: int, groups: int,
                keep: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The ridge fit with whole attention heads removed (block OBS); `fit` must be summed over ranks.

    `rows` are the output linear's inputs: `groups` key/value groups of query heads, each head a block
    of `head_dim` rows. Removing a block B and refitting the rest costs ``tr(W_B^T [H^-1]_BB^-1 W_B)``
    and is a rank-|B| update of W and H^-1 (OBS for a block, as for one row in `prune`). Whole groups
    go first, the cheapest group (all its query heads, one block) at a time, until `keep[0]` remain;
    then single query heads, the cheapest of any group that still has more than `keep[1]`, so every
    group keeps the same number (the stock classes need it). The kept rows' fit is then solved afresh
    from the sums. Returns that fit, the kept indices (in order) and the calibration errors of the
    prior (all rows) and of the pruned fit.
    """
    n = fit.xx.shape[0]
    error_prior = fit.error(prior)
    lam, shift = _ridge(fit.xx, ridge)
    b = torch.add(fit.xy, prior, alpha=lam)  # (in float64, whatever the prior's dtype)
    failure = ("pruning attention heads: the least-squares statistics are not finite or not positive definite; "
               "try a larger --ridge")
    hinv, shift = _searchable_inverse(fit.xx, shift, torch.float64, failure)
    heads, _ = _head_search(hinv, hinv @ b.to(torch.float64), rows, head_dim, groups, keep)
    kept_rows = torch.ones(n, dtype=torch.bool, device=b.device)
    kept_rows[rows.start:rows.stop] = False
    for h in heads:
        kept_rows[rows.start + h * head_dim:rows.start + (h + 1) * head_dim] = True
    kept = kept_rows.nonzero().flatten()
    xx, fit.xx = fit.xx, None  # consumed, as in `prune`
    w, error_fit = _ridge_solution(_take(xx, kept), _take_rows(b, kept), prior, shift, lam, fit.yy, fit.tokens,
                                   failure, kept)
    return w, kept, error_prior, error_fit


def head_removal_costs(xx: torch.Tensor, weights: torch.Tensor, ridge: float, rows: range, head_dim: int,
                       groups: int, layouts: Sequence[tuple[int, int]]) -> list[float]:
    """What pruning a linear's own weights down to each head layout costs (`prune_heads`'s search
    without its fit), summed over the tokens of the Gram `xx` of its inputs: `weights` ([inputs,
    outputs]) are the ridge fit of their own outputs, so no X^T Y is needed (`removal_costs` for heads).
    One inverse serves every layout."""
    failure = ("pricing attention heads: the least-squares statistics are not finite or not positive definite; "
               "try a larger --ridge")
    hinv, _ = _searchable_inverse(xx, _ridge(xx, ridge)[1], torch.float64, failure)
    w = weights.to(device=hinv.device, dtype=torch.float64)
    return [_head_search(hinv, w, rows, head_dim, groups, tuple(keep))[1] for keep in layouts]


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
        if not chosen:
            continue
        out[part] = {"error_paper": sum(f.error_paper for f in chosen),
                     "error_fitted": sum(f.error_fitted for f in chosen)}
    return out
