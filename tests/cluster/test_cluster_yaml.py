"""``cluster.yaml`` against Ray's own autoscaler validator (no network, no boto3, no Ray runtime).

``ray up`` runs ``prepare_config`` (merges ``ray/autoscaler/aws/defaults.yaml``, fills the per-node
``min_workers``/``max_workers``, merges setup commands) and then ``validate_config`` (jsonschema
against ``ray/autoscaler/ray-schema.json`` plus the head-node-type and min-workers checks). Both are
private Ray APIs, pinned by ``ray==2.60.*``. ``validate_config`` on an unprepared config fails with
``Missing 'cluster_synced_files'``, so every check here prepares first, like ``ray up``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


def _validate(raw: dict) -> dict:
    """What ``ray up`` does to a config before launching anything; returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_validator(raw) -> None:
    cfg = _validate(raw)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker node type"
    assert any(t["node_config"]["InstanceType"].startswith("g5.") for t in gpu.values())
    for name, t in gpu.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name


def test_unprepared_config_is_rejected_like_ray_up_would(raw) -> None:
    """Guards the test itself: validate_config alone needs the defaults prepare_config merges in."""
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(raw))


@pytest.mark.parametrize("good, typo", [
    ("\nmax_workers: 4\n", "\nmax_worker: 4\n"),                      # top level
    ("    min_workers: 1\n", "    min_worker: 1\n"),                   # inside a node type
    ("\nhead_setup_commands:\n", "\nhead_setup_comands:\n"),           # a command list
    ("  ssh_user: ubuntu\n", "  ssh_usr: ubuntu\n"),                   # auth
])
def test_a_misspelt_key_fails_validation(tmp_path, good, typo) -> None:
    """A one-key typo in a copy of the real file is caught, naming the key."""
    import jsonschema

    text = CLUSTER_YAML.read_text()
    assert text.count(good) == 1, f"cluster.yaml no longer contains {good!r} exactly once"
    bad_file = tmp_path / "cluster.yaml"
    bad_file.write_text(text.replace(good, typo))
    with pytest.raises(jsonschema.ValidationError, match=re.escape(repr(typo.split(":")[0].strip()))):
        _validate(yaml.safe_load(bad_file.read_text()))


def test_semantic_errors_fail_validation(raw) -> None:
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(bad)
    bad = copy.deepcopy(raw)
    bad["max_workers"] = 0  # below the sum of min_workers
    with pytest.raises(ValueError, match="min_workers"):
        _validate(bad)
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["head"]["resources"]["CPU"] = 7.5  # schema: integers
    with pytest.raises(Exception, match="is not of type 'integer'"):
        _validate(bad)


def test_serray_specific_settings(raw) -> None:
    """What the validator cannot know: install, shared storage, token auth, dashboard."""
    cfg = _validate(raw)
    mounts = cfg["file_mounts"]
    assert mounts.get("~/serray") == ".", "the working tree must be synced for `pip install -e`"
    assert "~/.ray/auth_token" in mounts
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/serray" in setup
    assert "/mnt/shared" in setup and "nfs4" in setup, "every node must mount the shared EFS at /mnt/shared"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--include-dashboard=true" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    excluded = set(cfg["rsync_exclude"])
    assert {".venv", "runs", ".git"} <= excluded
