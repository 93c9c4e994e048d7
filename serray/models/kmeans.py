"""Online (mini-batch, EMA) k-means used to derive local-attribute targets."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _dist_world() -> bool:
    """True when running inside an initialised process group of size > 1."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    """Squared euclidean distances ``[N, K]`` in float32 (autocast disabled)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        c = c.float()
        d = x.pow(2).sum(1, keepdim=True) - 2.0 * (x @ c.t()) + c.pow(2).sum(1)[None, :]
        return d.clamp_min_(0.0)


def _kmeanspp(x: Tensor, k: int) -> Tensor:
    """k-means++ seeding: ``k`` rows of ``x`` (distinct when possible)."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,)).item())]
    d2 = _sq_dists(x, x[idx[0]][None]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(probs, 1).item())
        idx.append(i)
        d2 = torch.minimum(d2, _sq_dists(x, x[i][None]).squeeze(1))
    return x[idx].clone()


def _random_rows(x: Tensor, k: int) -> Tensor:
    """``k`` random rows of ``x``, distinct when ``x`` has at least ``k`` rows."""
    n = x.shape[0]
    if n >= k:
        idx = torch.randperm(n, device=x.device)[:k]
    else:
        idx = torch.randint(n, (k,), device=x.device)
    return x[idx].clone()


class OnlineKMeans(nn.Module):
    """Mini-batch k-means with EMA centroid updates and dead-cluster re-seeding.

    State lives in buffers (``centroids`` [K, dim] float32, ``counts`` [K]
    float32 EMA of per-batch usage, ``initialized`` bool scalar, ``steps``
    long scalar) so it travels with ``state_dict``. Under
    ``torch.distributed`` (world size > 1) per-cluster sums/counts are
    all-reduced and the resulting state is broadcast from rank 0 after every
    update, keeping centroids bit-identical on all workers.

    Args:
        num_clusters: Number of clusters ``K``.
        dim: Feature dimension.
        decay: EMA decay for centroids and counts.
        dead_threshold: A cluster whose EMA usage share falls below this is
            re-seeded from a random row of the current batch.
        warmup_steps: Updates before dead-cluster checks start; defaults to
            ``ceil(1 / (1 - decay))``.
        init: ``"kmeans++"`` or ``"random"`` (distinct random rows).
    """

    centroids: Tensor
    counts: Tensor
    initialized: Tensor
    steps: Tensor

    def __init__(
        self,
        num_clusters: int,
        dim: int,
        decay: float = 0.99,
        dead_threshold: float = 1e-3,
        warmup_steps: int | None = None,
        init: str = "kmeans++",
    ) -> None:
        super().__init__()
        if init not in ("kmeans++", "random"):
            raise ValueError(f"unknown init {init!r}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.warmup_steps = (
            math.ceil(1.0 / max(1.0 - decay, 1e-6)) if warmup_steps is None else warmup_steps
        )
        self.init = init
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))
        self.register_buffer("counts", torch.zeros(num_clusters))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def assign(self, x: Tensor) -> Tensor:
        """Nearest centroid of each row.

        Args:
            x: ``[N, dim]`` features.

        Returns:
            long ``[N]`` cluster ids (squared euclidean distance, float32).
        """
        return _sq_dists(x, self.centroids).argmin(1)

    def objective(self, x: Tensor) -> Tensor:
        """Mean squared distance of ``x`` [N, dim] to its nearest centroid (float32 scalar)."""
        return _sq_dists(x, self.centroids).min(1).values.mean()

    def _seed(self, x: Tensor) -> None:
        """Initialise centroids from rows of ``x`` (float32) and reset counts."""
        k = self.num_clusters
        if self.init == "kmeans++" and x.shape[0] >= k:
            self.centroids.copy_(_kmeanspp(x, k))
        else:
            self.centroids.copy_(_random_rows(x, k))
        self.counts.fill_(max(x.shape[0], 1) / k)
        self.initialized.fill_(True)

    def _batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-cluster sums ``[K, dim]``, counts ``[K]`` and summed distance ``[1]``."""
        k = self.num_clusters
        sums = torch.zeros(k, self.dim, device=x.device)
        if x.shape[0] == 0:
            return sums, torch.zeros(k, device=x.device), torch.zeros(1, device=x.device)
        d = _sq_dists(x, self.centroids)
        mind, idx = d.min(1)
        sums.index_add_(0, idx, x)
        cnt = torch.bincount(idx, minlength=k).float()
        return sums, cnt, mind.sum()[None]

    def _reseed_dead(self, x: Tensor) -> int:
        """Re-seed clusters whose EMA usage share is below the threshold."""
        if int(self.steps) < self.warmup_steps or x.shape[0] == 0:
            return 0
        share = self.counts / self.counts.sum().clamp_min(1e-12)
        dead = share < self.dead_threshold
        num_dead = int(dead.sum())
        if num_dead:
            self.centroids[dead] = _random_rows(x, num_dead)
            self.counts[dead] = self.counts[~dead].mean() if num_dead < self.num_clusters else 1.0
        return num_dead

    @torch.no_grad()
    def update(self, x: Tensor) -> dict:
        """One mini-batch k-means step.

        Args:
            x: ``[N, dim]`` already-selected valid frames.

        Returns:
            ``{"entropy": float (nats, usage of this batch), "dead": int
            (clusters re-seeded), "inertia": float (mean squared distance
            before the update)}``.
        """
        x = x.detach().float()
        distributed = _dist_world()
        if x.shape[0] == 0 and not distributed:
            return {"entropy": 0.0, "dead": 0, "inertia": 0.0}
        if not bool(self.initialized):
            if x.shape[0] > 0:
                self._seed(x)
            if distributed:
                self._broadcast_state()
                self.initialized.fill_(True)
        sums, cnt, inertia = self._batch_stats(x)
        totals = torch.cat([cnt, inertia, x.new_tensor([x.shape[0]])])
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(totals)
        cnt, inertia_sum, n = totals[:-2], totals[-2], totals[-1]
        self._ema_step(sums, cnt)
        num_dead = self._reseed_dead(x)
        if distributed:
            self._broadcast_state()
        return {
            "entropy": _entropy(cnt),
            "dead": num_dead,
            "inertia": float(inertia_sum / n.clamp_min(1.0)),
        }

    def _ema_step(self, sums: Tensor, cnt: Tensor) -> None:
        """EMA update of centroids (clusters with assignments) and counts."""
        used = cnt > 0
        means = sums / cnt.clamp_min(1.0)[:, None]
        new = self.decay * self.centroids + (1.0 - self.decay) * means
        self.centroids.copy_(torch.where(used[:, None], new, self.centroids))
        self.counts.mul_(self.decay).add_((1.0 - self.decay) * cnt)
        self.steps.add_(1)

    def _broadcast_state(self) -> None:
        """Make every rank hold rank 0's centroids, counts and step count."""
        for buf in (self.centroids, self.counts, self.steps):
            dist.broadcast(buf, src=0)


def _entropy(cnt: Tensor) -> float:
    """Entropy in nats of a histogram."""
    total = cnt.sum()
    if total <= 0:
        return 0.0
    p = cnt / total
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum())


__all__ = ["OnlineKMeans"]
