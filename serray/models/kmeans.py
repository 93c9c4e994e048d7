"""Online (mini-batch, EMA) k-means used to derive local-attribute targets."""

from __future__ import annotations

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
    """Mini-batch k-means with EMA sums and counts (VQ-VAE style) and dead-cluster re-seeding.

    Each update moves a centroid by the EMA of the *sums* and *counts* of the frames assigned to
    it, ``c_k <- (g N_k c_k + (1-g) s_k) / (g N_k + (1-g) n_k)`` (``s_k``, ``n_k``: this batch's
    sum and count for cluster k; ``N_k``: the EMA count), so a cluster that got one frame moves
    a little and one that got a thousand moves a lot; an unused cluster stays where it is.
    A cluster that received no frame for ``dead_patience`` consecutive updates, or whose EMA usage
    share fell below ``dead_threshold``, is re-seeded from a random frame of the current batch
    (so short runs recover dead clusters within a few steps, not hundreds).

    State lives in buffers (``centroids`` [K, dim] float32, ``counts`` [K] float32 EMA counts,
    ``idle`` [K] updates since a cluster last got a frame, ``initialized`` bool scalar, ``steps``
    long scalar) so it travels with ``state_dict``. Under ``torch.distributed`` (world size > 1)
    per-cluster sums/counts are all-reduced and the resulting state is broadcast from rank 0
    after every update, keeping centroids bit-identical on all workers.

    Args:
        num_clusters: Number of clusters ``K``.
        dim: Feature dimension.
        decay: EMA decay ``g`` of sums and counts.
        dead_threshold: EMA usage share below which a cluster counts as dead.
        dead_patience: consecutive updates without a frame after which a cluster counts as dead.
        warmup_steps: updates before the share test starts (the idle test starts at once).
        init: ``"kmeans++"`` or ``"random"`` (distinct random rows).
    """

    centroids: Tensor
    counts: Tensor
    idle: Tensor
    initialized: Tensor
    steps: Tensor

    def __init__(
        self,
        num_clusters: int,
        dim: int,
        decay: float = 0.99,
        dead_threshold: float = 1e-3,
        dead_patience: int = 5,
        warmup_steps: int = 10,
        init: str = "kmeans++",
    ) -> None:
        super().__init__()
        if init not in ("kmeans++", "random"):
            raise ValueError(f"unknown init {init!r}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.dead_patience = dead_patience
        self.warmup_steps = warmup_steps
        self.init = init
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))
        self.register_buffer("counts", torch.zeros(num_clusters))
        self.register_buffer("idle", torch.zeros(num_clusters, dtype=torch.long))
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
        self.idle.zero_()
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
        """Re-seed clusters idle for ``dead_patience`` updates or below the usage-share threshold."""
        if x.shape[0] == 0:
            return 0
        dead = self.idle >= self.dead_patience
        if int(self.steps) >= self.warmup_steps:
            share = self.counts / self.counts.sum().clamp_min(1e-12)
            dead |= share < self.dead_threshold
        num_dead = int(dead.sum())
        if num_dead:
            self.centroids[dead] = _random_rows(x, num_dead)
            self.counts[dead] = self.counts[~dead].mean() if num_dead < self.num_clusters else 1.0
            self.idle[dead] = 0
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
        """EMA of per-cluster sums and counts: ``c <- (g N c + (1-g) s) / (g N + (1-g) n)``."""
        g = self.decay
        new_counts = g * self.counts + (1.0 - g) * cnt
        ema_sums = g * self.counts[:, None] * self.centroids + (1.0 - g) * sums
        used = cnt > 0
        self.centroids.copy_(torch.where(used[:, None], ema_sums / new_counts.clamp_min(1e-12)[:, None], self.centroids))
        self.counts.copy_(new_counts)
        self.idle.copy_(torch.where(used, torch.zeros_like(self.idle), self.idle + 1))
        self.steps.add_(1)

    def _broadcast_state(self) -> None:
        """Make every rank hold rank 0's centroids, counts and step count."""
        for buf in (self.centroids, self.counts, self.idle, self.steps):
            dist.broadcast(buf, src=0)


def _entropy(cnt: Tensor) -> float:
    """Entropy in nats of a histogram."""
    total = cnt.sum()
    if total <= 0:
        return 0.0
    p = cnt / total
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum())


__all__ = ["OnlineKMeans"]
