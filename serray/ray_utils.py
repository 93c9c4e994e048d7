"""Starting (or joining) Ray the same way from every entry point."""

from __future__ import annotations

import os
import sys

import ray


def progress_bars_enabled(cfg) -> bool:
    """Ray Data progress bars: the config decides; by default on in a terminal, off in CI and logs."""
    if cfg.ray.progress_bars is not None:
        return bool(cfg.ray.progress_bars)
    return not os.environ.get("CI") and sys.stdout.isatty()


def init_ray(cfg) -> None:
    """``ray.init`` once per process: join ``ray.address`` / $RAY_ADDRESS or start a local Ray.

    Worker processes get the same progress-bar setting and Train's print patch off (it prints
    every worker line twice).
    """
    from ray.data import DataContext

    progress = progress_bars_enabled(cfg)
    DataContext.get_current().enable_progress_bars = progress
    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "0" if progress else "1"}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    elif cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)


def require_resources(cfg, demand: dict, what: str, count: int = 1) -> None:
    """Wait (up to ``ray.resource_wait_s``) until the Ray cluster has a node that can hold one unit of
    ``demand`` (e.g. ``{"CPU": 1, "GPU": 1}``) and, in all, ``count`` of them; then return. A demand the
    cluster cannot meet in that time -- ``features.num_gpus=1`` on a CPU-only cluster -- is a
    :class:`ConfigError` naming ``what`` and the resources there are, not a run that waits forever. An
    autoscaling cluster gets the wait to add nodes."""
    import time

    from serray.errors import ConfigError

    demand = {k: float(v) for k, v in demand.items() if v and float(v) > 0}
    if not demand or not ray.is_initialized():
        return
    deadline = time.monotonic() + float(cfg.ray.resource_wait_s)
    while True:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        fits = [min(int(r.get(k, 0.0) // v) for k, v in demand.items()) for r in nodes]
        if fits and max(fits) >= 1 and sum(fits) >= count:
            return
        if time.monotonic() >= deadline:
            have = ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items())
                             if k in ("CPU", "GPU") or k in demand) or "nothing"
            need = ", ".join(f"{k}={v:g}" for k, v in demand.items())
            raise ConfigError(
                f"{what} asks for {need} per worker ({count} worker{'s' if count > 1 else ''}), but the Ray cluster "
                f"has {have} (largest node fits {max(fits, default=0)}); waited {cfg.ray.resource_wait_s:g} s "
                f"(ray.resource_wait_s). Lower the request or add nodes with those resources.")
        time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
