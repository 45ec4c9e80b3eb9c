"""Fréchet distance, Gaussian statistics and the Inception Score, all in float64.

torch-fidelity 0.4.0 computes FID only from two feature sets it extracted itself and
asserts equal dtypes of mu/sigma; published reference statistics come as (mu, sigma)
npz files. So the distance is computed here from (mu, sigma).

A score must not depend on the run layout (batch size, process count, arrival order),
and float sums do depend on their order. So the statistics keep every feature row with
its global image index (as torch-fidelity keeps all features: N x D float32, 400 MB at
FID-50k with 2048-d Inception features) and reduce them once, in index order and in
fixed chunks, after the rows of all ranks have been gathered.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrt(s1 s2)) between two Gaussians, in float64.

    Tr sqrt(s1 s2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix sqrt(s1) s2 sqrt(s1), which are those of s1 s2. This is the same
    quantity the usual scipy.linalg.sqrtm(s1 @ s2) route gives (tested), but symmetric
    eigendecompositions are far cheaper than the general matrix square root at 2048 dims,
    and singular products (fewer images than dims) need no eps offset and give no
    complex parts.
    """
    mu1, mu2 = (torch.as_tensor(np.atleast_1d(np.asarray(m, np.float64))) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(np.atleast_2d(np.asarray(s, np.float64))) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                               ("sigma2", sigma2, (d, d))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} (feature dim {d} from mu1)")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf")
    # Covariances are symmetric PSD; symmetrise and clip round-off negatives.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    evals, evecs = torch.linalg.eigh(sigma1)
    root1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root1 @ sigma2 @ root1
    trace_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * trace_covmean)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (NCCL only reduces CUDA tensors, so move it there)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    buffer = tensor.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


# Rows reduced per matmul when the statistics are computed: fixed, so the float sums are
# the same for any batch size or process count.
REDUCE_CHUNK_ROWS = 4096


def gather_rows(rows: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, indices) of all ranks, ordered by index (a no-op sort without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else rows.device
        count = torch.tensor([rows.shape[0]], device=device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        padded = rows.new_zeros((longest, *rows.shape[1:])).to(device)
        padded[:rows.shape[0]] = rows.to(device)
        padded_idx = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded_idx[:rows.shape[0]] = indices.to(device)
        all_rows = [torch.empty_like(padded) for _ in counts]
        all_idx = [torch.empty_like(padded_idx) for _ in counts]
        dist.all_gather(all_rows, padded)
        dist.all_gather(all_idx, padded_idx)
        rows = torch.cat([r[:int(c.item())] for r, c in zip(all_rows, counts)]).cpu()
        indices = torch.cat([i[:int(c.item())] for i, c in zip(all_idx, counts)]).cpu()
    order = torch.argsort(indices, stable=True)
    return rows[order], indices[order]


class _IndexedRows:
    """Rows collected with their global index; `all_gather` puts every rank's rows, in
    index order, on every rank."""

    def __init__(self, width: int):
        self.width = int(width)
        self._rows: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._next = 0  # index given to rows that come without one (arrival order)

    def _add(self, rows: torch.Tensor, indices, what: str) -> None:
        rows = torch.as_tensor(rows).detach().cpu()
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"{what} have shape {tuple(rows.shape)}, expected [N, {self.width}]")
        if indices is None:
            indices = torch.arange(self._next, self._next + rows.shape[0])
        indices = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        if indices.numel() != rows.shape[0]:
            raise ValueError(f"{indices.numel()} indices for {rows.shape[0]} {what}")
        self._next = max(self._next, int(indices.max()) + 1) if indices.numel() else self._next
        self._rows.append(rows)
        self._indices.append(indices)

    def rows(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._rows:
            return torch.zeros(0, self.width, dtype=dtype), torch.zeros(0, dtype=torch.long)
        rows, indices = torch.cat(self._rows), torch.cat(self._indices)
        order = torch.argsort(indices, stable=True)
        return rows[order].to(dtype), indices[order]

    def _merge(self, other: _IndexedRows) -> None:
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of dims {self.width} and {other.width}")
        self._rows += other._rows
        self._indices += other._indices
        self._next = max(self._next, other._next)

    def _all_gather(self) -> None:
        rows, indices = gather_rows(*self.rows(torch.float32 if self._float32() else torch.float64))
        self._rows, self._indices = [rows], [indices]

    def _float32(self) -> bool:
        return all(r.dtype == torch.float32 for r in self._rows)

    @property
    def count(self) -> int:
        return sum(r.shape[0] for r in self._rows)


class GaussianStats(_IndexedRows):
    """Mean and covariance of feature vectors keyed by global image index, in float64.

    mu = S / n and sigma = (Q - n mu mu^T) / (n - 1), the unbiased covariance as
    numpy.cov (and hence torch-fidelity) computes it; S and Q are summed in index order
    over fixed chunks, so the result depends only on the set of (index, features) pairs.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        self.dim = self.width

    def update(self, features: torch.Tensor, indices=None) -> None:
        """Add feature rows; `indices` are their global image indices (default: arrival order)."""
        self._add(features, indices, "features")

    def merge(self, other: GaussianStats) -> GaussianStats:
        self._merge(other)
        return self

    def all_reduce(self) -> GaussianStats:
        """Gather the rows of all ranks onto every rank (a no-op without torch.distributed)."""
        self._all_gather()
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        rows, _ = self.rows(torch.float64)
        total = torch.zeros(self.dim, dtype=torch.float64)
        outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for chunk in rows.split(REDUCE_CHUNK_ROWS):
            total += chunk.sum(0)
            outer += chunk.T @ chunk
        n = rows.shape[0]
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()


class InceptionScoreStats(_IndexedRows):
    """Inception Score from logits keyed by global image index.

    Image i goes to split k when k N / S <= i < (k+1) N / S (torch-fidelity's contiguous
    splits, without its shuffle: our labels already cycle through the classes, so every
    split is class-balanced). Per split, IS_k = exp(E[sum p log p] - sum q log q) with q
    the split's mean class distribution; sums run in index order.
    """

    def __init__(self, num_images: int, num_classes: int, splits: int = 10):
        if num_images < splits:
            raise ValueError(f"the Inception Score needs at least splits={splits} images, got {num_images}")
        super().__init__(num_classes)
        self.num_images, self.splits = int(num_images), int(splits)
        self.bounds = torch.tensor([k * num_images // splits for k in range(splits + 1)])

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        self._add(logits, indices, "logits")

    def all_reduce(self) -> InceptionScoreStats:
        self._all_gather()
        return self

    def compute(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores."""
        logits, indices = self.rows(torch.float64)
        split = torch.searchsorted(self.bounds, indices, right=True) - 1
        scores = []
        for k in range(self.splits):
            log_p = logits[split == k].log_softmax(dim=1)
            p = log_p.exp()
            q = p.mean(0)
            q_log_q = torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum()
            scores.append(float(((p * log_p).sum(1).mean() - q_log_q).exp()))
        return float(np.mean(scores)), float(np.std(scores))
