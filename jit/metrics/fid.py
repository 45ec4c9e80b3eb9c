"""Fréchet distance, streaming Gaussian statistics and the Inception Score, all in float64.

torch-fidelity 0.4.0 computes FID only from two feature sets it extracted itself and
asserts equal dtypes of mu/sigma; published reference statistics come as (mu, sigma)
npz files. So the distance is computed here from (mu, sigma), and features are reduced
to sufficient statistics as they stream out of the extractor: memory stays constant in
the number of images and the statistics of several ranks simply add up.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrt(s1 s2)) between two Gaussians, in float64.

    Tr sqrt(s1 s2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix sqrt(s1) s2 sqrt(s1), which are those of s1 s2. This is the same
    quantity the usual scipy.linalg.sqrtm(s1 @ s2) route gives (tested), but two symmetric
    eigendecompositions are ~10x faster than sqrtm at 2048 dims (a minute on two CPU
    cores), and singular products (fewer images than dims) need no eps offset and give
    no complex parts.
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


class GaussianStats:
    """Running sum, sum of outer products and count of feature vectors, in float64.

    mu = S / n and sigma = (Q - n mu mu^T) / (n - 1), the unbiased covariance as
    numpy.cov (and hence torch-fidelity) computes it.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features have shape {tuple(x.shape)}, expected [N, {self.dim}]")
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.count += x.shape[0]

    def merge(self, other: GaussianStats) -> GaussianStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dims {self.dim} and {other.dim}")
        self.sum += other.sum
        self.outer += other.outer
        self.count += other.count
        return self

    def all_reduce(self) -> GaussianStats:
        """Sum the statistics of all ranks in place (a no-op without torch.distributed)."""
        packed = torch.cat([self.sum, self.outer.flatten(), torch.tensor([float(self.count)], dtype=torch.float64)])
        packed = all_reduce_sum(packed)
        self.sum = packed[: self.dim].clone()
        self.outer = packed[self.dim : self.dim + self.dim**2].reshape(self.dim, self.dim).clone()
        self.count = round(packed[-1].item())
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


class InceptionScoreStats:
    """Inception Score from logits with constant memory, split by global image index.

    Image i goes to split k when k N / S <= i < (k+1) N / S (torch-fidelity's contiguous
    splits, without its shuffle: our labels already cycle through the classes, so every
    split is class-balanced). Per split, IS_k = exp(E[sum p log p] - sum q log q) with q
    the split's mean class distribution, so the sums of p and of sum p log p suffice.
    """

    def __init__(self, num_images: int, num_classes: int, splits: int = 10):
        if num_images < splits:
            raise ValueError(f"the Inception Score needs at least splits={splits} images, got {num_images}")
        self.num_images, self.splits = int(num_images), int(splits)
        self.bounds = torch.tensor([k * num_images // splits for k in range(splits + 1)])
        self.p_sum = torch.zeros(splits, num_classes, dtype=torch.float64)
        self.neg_entropy_sum = torch.zeros(splits, dtype=torch.float64)
        self.count = torch.zeros(splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        logits = logits.detach().to("cpu", torch.float64)
        split = torch.searchsorted(self.bounds, torch.as_tensor(indices).cpu(), right=True) - 1
        log_p = logits.log_softmax(dim=1)
        p = log_p.exp()
        self.p_sum.index_add_(0, split, p)
        self.neg_entropy_sum.index_add_(0, split, (p * log_p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def all_reduce(self) -> InceptionScoreStats:
        self.p_sum = all_reduce_sum(self.p_sum)
        self.neg_entropy_sum = all_reduce_sum(self.neg_entropy_sum)
        self.count = all_reduce_sum(self.count)
        return self

    def compute(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores."""
        q = self.p_sum / self.count[:, None]
        q_log_q = torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(1)
        scores = (self.neg_entropy_sum / self.count - q_log_q).exp().numpy()
        return float(np.mean(scores)), float(np.std(scores))
