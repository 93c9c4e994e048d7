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
