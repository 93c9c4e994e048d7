"""Two Ray nodes on one machine (``ray.cluster_utils.Cluster``), serray pre-training with 2 Train workers.

    python tests/cluster/multinode_pretrain.py OUT_DIR [key=value ...]

Runs in its own process with a private ``RAY_TMPDIR`` (see ``ray_isolation``), so the caller's Ray
(pytest's session Ray, anything else on the machine) is neither joined nor stopped. Steps:

1. a head node and a worker node, 3 logical CPUs each, each tagged with a custom resource;
2. the serray config joins that cluster (``ray.address``); synthetic corpus, manifest and fbank
   featurization (Ray Data) under OUT_DIR;
3. ``run_pretrain`` with ``pretrain.num_workers=2`` and ``pretrain.cpus_per_worker=2``: one worker
   does not fit twice in a 3-CPU node, so Ray Train's default PACK placement must put one worker on
   each node (the CPU stand-in for one GPU worker per g5.xlarge), and 1 CPU per node stays free for
   the Ray Data tasks that stream the Parquet to the workers (``features.cache_max_mb=0``: no
   object-store cache, every epoch reads Parquet);
4. the node of every Ray Train worker (``RayTrainWorker`` actors in the State API) and of every
   Parquet read task goes to OUT_DIR/placement.json, with the timings.

Exits non-zero on any failure. Everything it started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]  # helpers, this serray
import ray_isolation  # noqa: E402

NODE_CPUS = 3
TINY = ["synthetic.utterances_per_dialog=3", "synthetic.dialogs_per_session=2", "pretrain.epochs=1",
        "pretrain.batch_size=8", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=4", "ray.progress_bars=false", "pretrain.per_fold=false"]
PLACEMENT = ["pretrain.num_workers=2", "pretrain.cpus_per_worker=2", "features.cache_max_mb=0"]


def main(out: Path, overrides: list[str]) -> int:
    t0 = time.time()
    tmpdir, own_tmpdir = ray_isolation.isolate_if_needed()  # before anything imports ray
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"ray_tmpdir": tmpdir}
    cluster = None
    try:
        import ray

        cluster, report["cluster_start_attempts"] = start_cluster(tmpdir)
        report["cluster_up_s"] = round(time.time() - t0, 1)

        from serray.config import load_config
        from serray.data.features.featurize import featurize
        from serray.data.prepare import prepare_corpus
        from serray.ray_utils import init_ray
        from serray.train.pretrain import run_pretrain

        cfg = load_config(None, [f"output_dir={out}", f"ray.address={cluster.address}", *TINY, *PLACEMENT,
                                 *overrides])
        init_ray(cfg)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        report["nodes"] = {nid: ("head" if "serray_head" in n["Resources"] else "worker")
                           for nid, n in nodes.items()}
        report["cluster_resources"] = ray.cluster_resources()
        t1 = time.time()
        prepare_corpus(cfg, echo=lambda s: None)
        report["featurize"] = {k: v for k, v in featurize(cfg).items() if isinstance(v, (int, float, str))}
        report["featurize_s"] = round(time.time() - t1, 1)
        t2 = time.time()
        from serray.tracking import Tracker

        tracker = Tracker.of(cfg)  # the embedded store under output_dir: the nodes share this machine's disk
        summary = run_pretrain(cfg, tracking=tracker.target())
        report["pretrain_s"] = round(time.time() - t2, 1)
        runs = tracker.client().search_runs([tracker.experiment_id])
        report["mlflow_runs"] = [{"name": r.info.run_name, "status": r.info.status, "tags": r.data.tags,
                                  "metrics": sorted(r.data.metrics),
                                  "epochs": [m.step for m in tracker.client().get_metric_history(r.info.run_id, "loss")]}
                                 for r in runs]
        report["pretrain"] = {"adapter": summary["adapter"], "reused": summary["reused"],
                              "ray_dir": summary.get("ray_dir")}
        report.update(_placement())
        report["ok"] = True
    except BaseException:
        report["ok"] = False
        report["error"] = traceback.format_exc()
        traceback.print_exc()
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:
                traceback.print_exc()
        report["left_after_shutdown"] = ray_isolation.kill_private_ray(tmpdir, grace_s=5)["signalled"]
        report["total_s"] = round(time.time() - t0, 1)
        report["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)  # timings depend on it
        (out / "placement.json").write_text(json.dumps(report, indent=2, default=str))
        if own_tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        print(json.dumps({k: v for k, v in report.items() if k != "error"}, default=str))
    return 0 if report["ok"] else 1


def start_cluster(tmpdir: str, attempts: int = 3):
    """Head + worker node. A node that does not register within Ray's fixed 30 s (seen at load
    average 60 on 2 cores: "The current node timed out during startup") is retried from scratch."""
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": NODE_CPUS, "resources": {"serray_head": 1},
                "dashboard_port": ray_isolation.free_port(),  # State API (Train V2 also needs it)
                "dashboard_agent_listen_port": ray_isolation.free_port(),
            })
            cluster.add_node(num_cpus=NODE_CPUS, resources={"serray_worker": 1})
            cluster.wait_for_nodes()
            return cluster, attempt
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"cluster start {attempt} timed out (load average {os.getloadavg()[0]:.0f}); retrying", flush=True)
            try:
                if cluster is not None:
                    cluster.shutdown()
            except Exception:
                pass
            ray_isolation.kill_private_ray(tmpdir)


def _placement() -> dict:
    """Node ids of the Train workers and of the Parquet read tasks (State API, dead ones included)."""
    from ray.util.state import list_actors, list_tasks

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000,
                          raise_on_missing_output=False)
    reads = list_tasks(filters=[("name", "=", "ReadFilesParquetV2")], detail=True, limit=10000,
                       raise_on_missing_output=False)
    if not reads:  # the operator name differs between Ray versions: fall back on a prefix match
        reads = [t for t in list_tasks(detail=True, limit=10000, raise_on_missing_output=False)
                 if "ReadFiles" in (t.name or "") or "ReadParquet" in (t.name or "")]
    return {"train_worker_nodes": sorted(a.node_id for a in workers if a.node_id),
            "parquet_read_task_nodes": sorted({t.node_id for t in reads if t.node_id})}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2:]))
