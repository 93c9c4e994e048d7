"""Waiting for resources the cluster does not have ends with a clear error (``ray.resource_wait_s``)."""

from __future__ import annotations

import time

import pytest

from serray.config import load_config
from serray.errors import ConfigError


@pytest.mark.ray
def test_require_resources_returns_when_a_node_fits_and_fails_clearly_when_none_does(ray_session, tmp_path):
    from serray.ray_utils import require_resources

    cfg = load_config(None, [f"output_dir={tmp_path}", "ray.resource_wait_s=0.5"])  # the test Ray has 2 CPUs, no GPU
    require_resources(cfg, {"CPU": 1.0}, "x", count=2)
    require_resources(cfg, {"CPU": 1.0, "GPU": 0.0}, "x")  # a zero request is no request
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"features.num_gpus asks for CPU=1, GPU=1 per worker.*has CPU=2.*ray.resource_wait_s"):
        require_resources(cfg, {"CPU": 1.0, "GPU": 1.0}, "features.num_gpus")
    assert 0.4 < time.monotonic() - t0 < 10  # it waited, then gave up
    with pytest.raises(ConfigError, match="3 workers"):
        require_resources(cfg, {"CPU": 1.0}, "pretrain", count=3)


@pytest.mark.ray
def test_featurize_on_a_gpu_the_cluster_lacks_is_a_config_error_not_a_hang(featurized, ray_session, tmp_path):
    from serray.data.featurize import featurize

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}",
                             f"data.manifest={featurized.data.manifest}", f"features.dir={tmp_path / 'f'}",
                             "features.num_gpus=1", "ray.resource_wait_s=0", "ray.progress_bars=false"])
    with pytest.raises(ConfigError, match=r"featurization \(features.num_cpus / features.num_gpus\) asks for .*GPU=1"):
        featurize(cfg)
