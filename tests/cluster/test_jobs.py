"""``serray pipeline`` as Ray jobs on a local head: ``jobs_harness.py`` (Job Submission SDK).

The harness starts its own ``ray start --head`` (private ``RAY_TMPDIR``, private auth token, free
ports), submits a tiny pipeline and a misspelt-key one with ``runtime_env={"working_dir": <repo>}``,
and stops that head by its own processes (never ``ray stop``, which would also kill pytest's session
Ray). It runs as a subprocess so this process keeps its single ``ray.init``. One run (module
fixture) serves every test.
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

SCRIPT = Path(__file__).resolve().parent / "jobs_harness.py"
TIMEOUT_S = 900  # generous: the fixture took 500 s on a 2-core machine at load average 25

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def jobs(ray_session, tmp_path_factory):
    """``ray_session``: pytest's own Ray runs meanwhile, so coexisting with it is tested too."""
    out = tmp_path_factory.mktemp("jobs")
    tmpdir = ray_isolation.private_tmpdir()
    log = out / "harness.log"
    try:
        with log.open("w") as f:
            proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=ray_isolation.REPO,
                                  env=ray_isolation.child_env(tmpdir, SERRAY_JOB_TIMEOUT_S=str(TIMEOUT_S - 60)),
                                  stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    finally:
        leftovers = ray_isolation.kill_private_ray(tmpdir)  # a no-op unless the harness died half-way
    report_file = out / "jobs.json"
    assert report_file.is_file(), f"no report (rc={proc.returncode}):\n{ray_isolation.tail(log)}"
    report = json.loads(report_file.read_text())
    assert proc.returncode == 0 and report["ok"], f"{report.get('error')}\n{ray_isolation.tail(log)}\nRay logs: {tmpdir}"
    yield {"out": out, "report": report, "leftovers": leftovers, "tmpdir": tmpdir}
    shutil.rmtree(tmpdir, ignore_errors=True)  # its Ray session logs (the processes are gone)


def test_pipeline_job_succeeds(jobs) -> None:
    job = jobs["report"]["jobs"]["good"]
    assert job["status"] == "SUCCEEDED", f"{job['message']}\n{job['logs'][-4000:]}"
    assert job["driver_exit_code"] in (0, None)
    assert "[3/3] leave-one-session-out, folds [1, 2]: per fold, pre-train the adapter" in job["logs"]
    assert "[fold 1] pre-train epoch 1/1" in job["logs"] and "[fold 2] fine-tune epoch 1/1" in job["logs"]  # progress
    assert "Reporting training result" not in job["logs"]  # Ray's own lines go to output_dir/logs/ray.log
    assert "pipeline finished in" in job["logs"]


def test_pipeline_job_outputs(jobs) -> None:
    run = jobs["out"] / "pipeline"  # absolute output_dir: not inside the job's temporary working_dir
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [1, 2]
    for key in ("ua", "wa", "macro_f1"):
        assert 0.0 <= metrics["mean"][key] <= 1.0, key
        assert metrics["std"][key] >= 0.0, key
    for fold in (1, 2):  # one adapter per fold (the inductive protocol)
        assert (run / "pretrain" / f"fold{fold}" / "adapter" / "meta.json").is_file()
    assert (run / "logs" / "ray.log").stat().st_size > 0
    assert (run / "features" / "_serray_features.json").is_file()
    assert (run / "config.yaml").is_file()


def test_bad_config_job_fails_with_a_clear_error(jobs) -> None:
    job = jobs["report"]["jobs"]["bad"]
    assert job["status"] == "FAILED", job["message"]
    assert job["driver_exit_code"] in (2, None)
    assert "exit code 2" in job["message"]
    assert "serray pipeline: error:" in job["logs"]
    assert "unknown config key 'adapter.mask_ration'" in job["logs"]
    assert "adapter.mask_ratio" in job["logs"].split("unknown config key", 1)[1]  # the suggestion
    assert "Traceback" not in job["logs"]
    assert job["seconds"] is not None and job["seconds"] < 120  # fails fast: nothing ran


def test_only_the_private_head_was_stopped(jobs) -> None:
    stop = jobs["report"]["stop"]
    assert stop["signalled"], "the harness found no processes of its head"
    assert stop["left"] == [] and jobs["leftovers"]["left"] == []
    assert ray_isolation.pids_of_private_ray(jobs["tmpdir"]) == []
    ray_isolation.assert_own_ray_alive()
