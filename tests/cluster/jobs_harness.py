"""A private local Ray head + the serray pipeline submitted to it as Ray jobs (Job Submission SDK).

    python tests/cluster/jobs_harness.py OUT_DIR

1. ``ray start --head`` (2 CPUs, dashboard on, every port chosen free) with a private
   ``RAY_TMPDIR`` and a private auth token (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``),
   so no other Ray on the machine is joined, and ``~/.ray`` is not needed;
2. ``JobSubmissionClient`` submits, with ``runtime_env={"working_dir": <repo>, "excludes": [...]}``:
   * ``good``: ``python jobs/pipeline.py`` on a tiny synthetic corpus, writing to OUT_DIR/pipeline;
   * ``bad``: the same with a misspelt key (``adapter.mask_ration=0.5``);
   and waits for both to end;
3. stops that head only: its processes are found by the private ``RAY_TMPDIR`` (``ray stop`` would
   kill every Ray on the machine, pytest's included);
4. writes OUT_DIR/jobs.json (statuses, messages, logs, timings, leftover processes).

Exits 0 when the harness itself worked (the job outcomes are for the caller to judge).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]  # helpers, this serray
import ray_isolation  # noqa: E402

REPO = ray_isolation.REPO
TINY = ["synthetic.utterances_per_dialog=4", "synthetic.dialogs_per_session=2", "pretrain.epochs=1",
        "finetune.epochs=1", "finetune.folds=[1,2]", "adapter.d_model=32", "adapter.ff_dim=64",
        "adapter.num_layers=1", "adapter.num_clusters=4", "ray.progress_bars=false"]
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache"]
JOB_TIMEOUT_S = float(os.environ.get("SERRAY_JOB_TIMEOUT_S", 540))


def start_head(tmpdir: str, log: Path, attempts: int = 3) -> dict:
    """``ray start --head`` on free ports; returns the ports and the dashboard URL.

    A head that fails to come up (Ray gives a node a fixed 30 s to register, too short at load
    average 60 on 2 cores) is stopped and started again on new ports.
    """
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    t0 = time.time()
    for attempt in range(1, attempts + 1):
        ports = {name: ray_isolation.free_port() for name in
                 ("port", "dashboard-port", "dashboard-agent-listen-port", "ray-client-server-port")}
        cmd = [ray_bin, "start", "--head", "--num-cpus=2", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats", f"--temp-dir={tmpdir}/ray", *[f"--{k}={v}" for k, v in ports.items()]]
        with log.open("a") as f:
            rc = subprocess.run(cmd, env=os.environ.copy(), stdout=f, stderr=subprocess.STDOUT, timeout=180,
                                start_new_session=True).returncode  # our process group's signals must not hit it
        if rc == 0:
            return {"cmd": cmd, "ports": ports, "address": f"http://127.0.0.1:{ports['dashboard-port']}",
                    "start_s": round(time.time() - t0, 1), "attempts": attempt}
        ray_isolation.kill_private_ray(tmpdir)
    raise RuntimeError(f"`ray start --head` failed {attempts} times:\n{ray_isolation.tail(log, 30)}")


def client(address: str, timeout_s: float = 60.0):
    """A JobSubmissionClient, once the job server answers."""
    from ray.job_submission import JobSubmissionClient

    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            return JobSubmissionClient(address)
        except Exception as e:  # the dashboard may still be starting
            last = e
            time.sleep(1)
    raise RuntimeError(f"job server at {address} did not answer in {timeout_s} s: {last}")


def main(out: Path) -> int:
    t0 = time.time()
    tmpdir, own_tmpdir = ray_isolation.isolate_if_needed()  # before anything imports ray
    # `python` in the entrypoint must be this interpreter (as with an activated venv)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"ray_tmpdir": tmpdir, "jobs": {}}
    try:
        report["head"] = start_head(tmpdir, out / "ray_start.log")
        from ray.job_submission import JobStatus

        c = client(report["head"]["address"])
        runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES}
        base = f"python jobs/pipeline.py --config configs/base.yaml output_dir={out / 'pipeline'} " + " ".join(TINY)
        entrypoints = {"good": base, "bad": base + " adapter.mask_ration=0.5"}
        submitted = {}
        for name, entry in entrypoints.items():
            submitted[name] = (c.submit_job(entrypoint=entry, runtime_env=runtime_env,
                                            submission_id=f"serray-{name}-{os.getpid()}"), time.time())
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.time() + JOB_TIMEOUT_S
        pending = dict(submitted)
        while pending and time.time() < deadline:
            for name, (jid, ts) in list(pending.items()):
                if c.get_job_status(jid) in terminal:
                    report["jobs"][name] = {"seconds": round(time.time() - ts, 1)}
                    del pending[name]
            time.sleep(1)
        for name, (jid, _) in submitted.items():
            info = c.get_job_info(jid)
            job = report["jobs"].setdefault(name, {"seconds": None})
            if name in pending:  # timed out: stop it, keep what it logged
                c.stop_job(jid)
            job.update({"id": jid, "entrypoint": entrypoints[name], "status": str(info.status),
                        "message": info.message, "driver_exit_code": getattr(info, "driver_exit_code", None),
                        "logs": c.get_job_logs(jid)})
        report["ok"] = True
    except BaseException:
        report["ok"] = False
        report["error"] = traceback.format_exc()
        traceback.print_exc()
    finally:
        t1 = time.time()
        stopped = ray_isolation.kill_private_ray(tmpdir)
        report["stop"] = {**stopped, "seconds": round(time.time() - t1, 1)}
        report["total_s"] = round(time.time() - t0, 1)
        report["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)  # timings depend on it
        (out / "jobs.json").write_text(json.dumps(report, indent=2, default=str))
        short = {k: v for k, v in report.items() if k not in ("jobs", "error")}
        short["jobs"] = {n: {k: v for k, v in j.items() if k != "logs"} for n, j in report["jobs"].items()}
        if own_tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        print(json.dumps(short, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]).resolve()))
