"""Starting (or joining) Ray the same way from every entry point."""

from __future__ import annotations

import os
import sys
import time
from typing import Dict

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
    if cfg.get("tracking") is not None and cfg.tracking.get("uri"):
        from serray.tracking import credentials_to_environment

        # before the local Ray starts: its workers inherit this process's environment, where MLflow
        # reads the tracking server's credentials (never passed in runtime_env, which the dashboard shows)
        credentials_to_environment(str(cfg.tracking.uri))
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "0" if progress else "1"}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    elif cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)


def _describe_nodes(nodes) -> str:
    out = []
    for n in nodes:
        r = n.get("Resources") or {}
        out.append(f"{{CPU: {r.get('CPU', 0):g}, GPU: {r.get('GPU', 0):g}}}")
    return ", ".join(out) or "none"


def wait_for_node(need: Dict[str, float], timeout_s: float, what: str, timeout_key: str, poll_s: float = 1.0) -> None:
    """Wait until some alive node of the cluster *has* ``need`` (its totals, not what is free now:
    busy resources free up, missing ones never do, unless an autoscaler adds a node meanwhile).

    Raises:
        ConfigError: after ``timeout_s`` with no such node, naming what was asked, what the nodes
            have, and ``timeout_key``.
    """
    from serray.errors import ConfigError

    need = {k: float(v) for k, v in need.items() if float(v) > 0}
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(all((n.get("Resources") or {}).get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
            return
        if time.monotonic() >= deadline:
            asked = ", ".join(f"{k}: {v:g}" for k, v in need.items())
            raise ConfigError(f"no node of the Ray cluster can host {what}: it needs {{{asked}}}, the nodes have "
                              f"{_describe_nodes(nodes)}; waited {timeout_s:g} s ({timeout_key}). Lower the request "
                              "or add a node that has it")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) or poll_s)
