"""Training workers that no node can host end with a clear error (``ray.resource_timeout_s``), not a hang.

(Featurization and Serve have their own waits: ``features.resource_timeout_s``, ``serve.start_timeout_s``,
tested with them.)
"""

from __future__ import annotations

import time

import pytest

from serray.config import load_config
from serray.errors import ConfigError


@pytest.mark.ray
def test_wait_for_node_returns_when_a_node_has_it_and_fails_clearly_when_none_does(ray_session):
    from serray.ray_utils import wait_for_node

    wait_for_node({"CPU": 2.0, "GPU": 0.0}, 0.0, "x", "k")  # the test Ray: 2 CPUs, no GPU
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"no node .* can host a thing: it needs \{CPU: 1, GPU: 1\}.*waited 0.5 s \(some.key\)"):
        wait_for_node({"CPU": 1.0, "GPU": 1.0}, 0.5, "a thing", "some.key", poll_s=0.1)
    assert 0.4 < time.monotonic() - t0 < 10  # it waited, then gave up


@pytest.mark.ray
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_training_on_a_gpu_the_cluster_lacks_is_a_config_error_not_a_hang(featurized, ray_session, tmp_path, stage):
    from serray.train.finetune import run_folds
    from serray.train.pretrain import run_pretrain

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank",
                             f"data.manifest={featurized.data.manifest}", f"features.dir={featurized.features.dir}",
                             f"{stage}.use_gpu=true", "ray.resource_timeout_s=0", "ray.progress_bars=false",
                             "finetune.folds=[1]", "finetune.mode=none" if stage == "finetune" else "pretrain.epochs=1"])
    with pytest.raises(ConfigError, match=rf"a {stage} worker \({stage}.cpus_per_worker / {stage}.use_gpu\): it needs "
                                          r"\{CPU: [0-9.]+, GPU: 1\}.*ray.resource_timeout_s"):
        (run_folds if stage == "finetune" else lambda c: run_pretrain(c, 1))(cfg)
    assert not (tmp_path / stage).exists() or not any((tmp_path / stage).rglob("*.pt"))  # nothing trained


def test_tracking_credentials_reach_the_workers_environment_before_ray_starts(monkeypatch):
    """A tracking server's ``user:password@``: moved into MLflow's variables *before* the local Ray
    starts, so its workers (fold runs log per epoch) inherit them; before, the tracker moved them only
    after ``serray pipeline`` had started Ray for featurizing, and the workers got 401s."""
    import ray

    from serray import ray_utils
    from serray.config import load_config

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "")  # recorded, so the value the code under test sets is undone after the test
        monkeypatch.delenv(key)
    seen = {}

    def fake_init(**kwargs):
        import os

        seen.update(user=os.environ.get("MLFLOW_TRACKING_USERNAME"), password=os.environ.get("MLFLOW_TRACKING_PASSWORD"),
                    runtime_env=kwargs.get("runtime_env"))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    ray_utils.init_ray(load_config(None, ["tracking.uri=http://alice:s3cret@mlflow.internal:5000"]))
    assert seen["user"] == "alice" and seen["password"] == "s3cret"
    assert "s3cret" not in str(seen["runtime_env"])  # never in the job's runtime_env (the dashboard shows it)
