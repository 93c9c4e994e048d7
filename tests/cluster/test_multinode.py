"""Pre-training on a two-node Ray cluster (both nodes on this machine): ``multinode_pretrain.py``.

The cluster runs in a subprocess with a private ``RAY_TMPDIR``: pytest keeps its single ``ray.init``
(the session fixture), and that Ray is neither joined nor stopped (checked below). One subprocess
run (module fixture) serves every assertion.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_isolation  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "multinode_pretrain.py"
TIMEOUT_S = 600  # generous: the fixture took 120 s on a 2-core machine at load average 25

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    """``ray_session``: pytest's own Ray runs meanwhile, so coexisting with it is tested too."""
    out = tmp_path_factory.mktemp("multinode")
    tmpdir = ray_isolation.private_tmpdir()
    log = out / "multinode.log"
    try:
        with log.open("w") as f:
            proc = subprocess.run([sys.executable, str(SCRIPT), str(out / "run")], cwd=ray_isolation.REPO,
                                  env=ray_isolation.child_env(tmpdir), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=TIMEOUT_S)
    finally:
        leftovers = ray_isolation.kill_private_ray(tmpdir)  # a no-op unless the script died half-way
    report_file = out / "run" / "placement.json"
    assert report_file.is_file(), f"no report (rc={proc.returncode}):\n{ray_isolation.tail(log)}"
    report = json.loads(report_file.read_text())
    assert proc.returncode == 0 and report["ok"], f"{report.get('error')}\n{ray_isolation.tail(log)}\nRay logs: {tmpdir}"
    yield {"out": out / "run", "report": report, "leftovers": leftovers, "tmpdir": tmpdir}
    shutil.rmtree(tmpdir, ignore_errors=True)  # its Ray session logs (the processes are gone)


def test_two_nodes_joined_the_cluster(run) -> None:
    report = run["report"]
    assert sorted(report["nodes"].values()) == ["head", "worker"]
    assert report["cluster_resources"]["CPU"] == 6


def test_train_workers_spread_over_both_nodes(run) -> None:
    """2 workers x 2 CPUs cannot share a 3-CPU node: one Ray Train worker per node."""
    report = run["report"]
    workers = report["train_worker_nodes"]
    assert len(workers) == 2, workers
    assert set(workers) == set(report["nodes"]), (workers, report["nodes"])


def test_parquet_is_read_through_ray_data_on_the_cluster(run) -> None:
    report = run["report"]
    assert report["featurize"]["written"] == report["featurize"]["stored"] > 0
    reads = report["parquet_read_task_nodes"]
    assert reads and set(reads) <= set(report["nodes"]), reads


def test_pretraining_finished_with_synchronised_centroids(run) -> None:
    pre = run["out"] / "pretrain"
    meta = json.loads((pre / "adapter" / "meta.json").read_text())
    assert meta["kind"] == "adapter" and meta["model"]["num_clusters"] == 4
    assert (pre / "adapter" / "state.pt").is_file()
    history = json.loads((pre / "history.json").read_text())
    assert history, "empty history"
    for epoch in history:
        assert epoch["centroid_sync_diff"] == 0.0, epoch  # only reported when world_size > 1
        assert epoch["loss"] == epoch["loss"]  # not NaN


def test_rank_0_on_either_node_logs_to_the_shared_mlflow_store(run) -> None:
    """``setup_mlflow`` on rank 0 (whichever node it landed on) wrote every epoch into the SQLite store
    under the shared output_dir; the run records the node that logged it."""
    runs = run["report"]["mlflow_runs"]
    assert len(runs) == 1, runs
    (r,) = runs
    assert r["name"] == "pretrain" and r["status"] == "FINISHED" and r["tags"]["stage"] == "pretrain"
    assert r["epochs"] == [0], r  # pretrain.epochs=1
    assert {"loss", "loss_cluster", "teacher_drift", "frames_per_s"} <= set(r["metrics"])
    assert r["tags"]["logged_from_node"] in run["report"]["nodes"], (r["tags"], run["report"]["nodes"])
    assert (run["out"] / "mlflow.db").is_file()


def test_private_cluster_is_gone_and_other_rays_untouched(run) -> None:
    assert run["leftovers"]["left"] == []
    assert ray_isolation.pids_of_private_ray(run["tmpdir"]) == []
    ray_isolation.assert_own_ray_alive()
