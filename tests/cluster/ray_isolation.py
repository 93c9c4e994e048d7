"""Running a second, private Ray on a machine that already has one (pytest's session Ray, other runs).

Two things make a second Ray unsafe by default, and this module handles both:

* ``ray start`` and ``ray.cluster_utils.Cluster`` write the new GCS address to
  ``$RAY_TMPDIR/ray/ray_current_cluster`` (default ``/tmp/ray``), and every later ``ray.init()``
  with no address on the machine *joins that cluster* instead of starting its own. A private
  ``RAY_TMPDIR`` (set before Ray starts) keeps that file, the session directories and the sockets
  out of ``/tmp/ray``.
* ``ray stop`` kills every Ray process on the machine that it may signal. Instead, the processes of a
  private Ray are found by the ``RAY_TMPDIR=<private dir>`` in their environment (every Ray
  process, worker and job entrypoint inherits it) or by their open files and command line under
  the private directory (:func:`pids_of_private_ray`), and only those are signalled.

Used by the helper scripts (``multinode_pretrain.py``, ``jobs_harness.py``) and by the tests.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]

#: Env vars a child Ray must not inherit from the parent (pytest's Ray, a job's driver).
_PARENT_RAY_VARS = ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_RAYLET_PID", "RAY_NODE_ID")

#: Set (to the private RAY_TMPDIR) by :func:`child_env`: "this process runs inside a private Ray dir".
PRIVATE_MARK = "SERRAY_PRIVATE_RAY_TMPDIR"


def isolate_if_needed() -> tuple[str, bool]:
    """For a helper script: use the private Ray dir its caller prepared (``child_env``), or make one.

    Returns ``(tmpdir, created)``; ``created``: this process made it and must remove it. A
    ``RAY_TMPDIR`` that the user set for other reasons is never taken as private: everything with
    that value would be killed at the end.
    """
    tmpdir = os.environ.get(PRIVATE_MARK)
    if tmpdir and os.environ.get("RAY_TMPDIR") == tmpdir:
        return tmpdir, False
    tmpdir = private_tmpdir()
    os.environ.update(child_env(tmpdir))
    return tmpdir, True


def private_tmpdir(prefix: str = "srt") -> str:
    """A fresh short directory for ``RAY_TMPDIR`` (short: Unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def private_token(tmpdir: str) -> str:
    """A private auth token file in ``tmpdir`` (``~/.ray/auth_token`` is neither needed nor touched)."""
    import secrets

    path = Path(tmpdir, "auth_token")
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return str(path)


def child_env(tmpdir: str, **extra: str) -> Dict[str, str]:
    """The environment of a process that runs a private Ray rooted at ``tmpdir``: token
    authentication with a token file of its own, no usage stats, no progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in _PARENT_RAY_VARS and k != "RAY_AUTH_TOKEN"}
    env.update({"RAY_TMPDIR": tmpdir, PRIVATE_MARK: tmpdir,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": private_token(tmpdir),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_of_private_ray(tmpdir: str) -> List[int]:
    """Processes (other than this one) that belong to the private Ray rooted at ``tmpdir``.

    A process belongs to it when its environment holds ``RAY_TMPDIR=<tmpdir>``, or its command line
    or one of its open files is under ``tmpdir``. The last two matter: Ray processes that rename
    themselves (``ray::IDLE``, ``ray::DashboardAgent``...) overwrite their ``/proc/PID/environ``,
    but they keep their logs in ``<tmpdir>/ray/session_*/logs`` open.
    """
    env_needle = f"RAY_TMPDIR={tmpdir}".encode()
    root = tmpdir.rstrip("/") + "/"
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if env_needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                out.append(int(entry.name))
                continue
            if root.encode() in Path(entry.path, "cmdline").read_bytes():
                out.append(int(entry.name))
                continue
            for fd in os.scandir(Path(entry.path, "fd")):
                try:
                    if os.readlink(fd.path).startswith(root):
                        out.append(int(entry.name))
                        break
                except OSError:
                    continue
        except OSError:  # gone meanwhile, or not ours
            continue
    return sorted(out)


def kill_private_ray(tmpdir: str, grace_s: float = 5.0, kill_wait_s: float = 20.0) -> Dict[str, List[int]]:
    """SIGTERM every process of the private Ray under ``tmpdir``, then SIGKILL what is left.

    ``gcs_server`` and the autoscaler monitor outlive a SIGTERM by more than 12 s (seen), so the
    grace period is short; call this only once the work is done (outputs are written by then).
    Processes that appear meanwhile (a raylet starting workers) are signalled too, and a killed
    process may take seconds to vanish on a loaded machine, hence the polling.

    Returns the pids signalled and the pids still alive at the end (should be empty).
    """
    signalled: set = set()
    deadline = time.time() + grace_s
    alive = pids_of_private_ray(tmpdir)
    while alive and time.time() < deadline:
        for pid in set(alive) - signalled:
            _signal(pid, signal.SIGTERM)
        signalled.update(alive)
        time.sleep(0.2)
        alive = pids_of_private_ray(tmpdir)
    deadline = time.time() + kill_wait_s
    while alive and time.time() < deadline:
        for pid in alive:
            _signal(pid, signal.SIGKILL)
        signalled.update(alive)
        time.sleep(0.5)
        alive = pids_of_private_ray(tmpdir)
    return {"signalled": sorted(signalled), "left": alive}


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def assert_own_ray_alive() -> None:
    """When this process has a Ray (pytest's session fixture), it still answers and was not joined
    to a private cluster: one alive node, whose session directory is not a private one."""
    import ray

    if not ray.is_initialized():
        return
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 1, alive
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    assert not session_dir.startswith("/tmp/srt"), session_dir
    assert ray.get(ray.put(41)) + 1 == 42


def session_dirs(tmpdir: str) -> List[str]:
    return sorted(str(p) for p in Path(tmpdir, "ray").glob("session_2*"))


def tail(path: Optional[Path], n: int = 60) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
