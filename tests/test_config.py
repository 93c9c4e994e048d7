"""Tests for serray.config (schema <- YAML <- overrides) and the CLI's handling of config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from serray.cli import main
from serray.config import BASE_CONFIG, SerrayConfig, load_config, save_config, section_hash
from serray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = [p for p in sorted(CONFIG_DIR.glob("*.yaml")) if p.name != "serve.yaml"]  # serve.yaml is a Ray Serve config (tests/serve)


def _keys(node, prefix: str = "") -> set:
    """Every dotted key of a DictConfig, recursively (sections and leaves)."""
    out = set()
    for k in node.keys():
        full = f"{prefix}{k}"
        out.add(full)
        sub = node._get_node(k)
        if isinstance(sub, DictConfig):
            out |= _keys(sub, f"{full}.")
    return out


def test_config_dir_has_files():
    assert BASE_CONFIG in [p.resolve() for p in CONFIG_FILES]
    assert len(CONFIG_FILES) >= 2


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path, tmp_path):
    cfg = load_config(path, [f"output_dir={tmp_path}", f"data.root={tmp_path / 'IEMOCAP_full_release'}"])
    assert OmegaConf.is_readonly(cfg)
    assert cfg.data.root == str(tmp_path / "IEMOCAP_full_release")
    # every interpolation is resolved
    assert "${" not in OmegaConf.to_yaml(cfg)
    assert cfg.encoder.name
    # the raw file itself loads too (no override needed for the data root to be a valid string)
    raw = load_config(path)
    assert raw.output_dir


def test_default_config_is_base_yaml():
    assert OmegaConf.to_container(load_config()) == OmegaConf.to_container(load_config(BASE_CONFIG))
    cfg = load_config(None, ["output_dir=/x/y"])
    assert cfg.data.root == "/x/y/synthetic/IEMOCAP_full_release"
    assert cfg.data.manifest == "/x/y/manifest.parquet"
    assert cfg.features.dir == "/x/y/features"


def test_base_yaml_lists_every_schema_key():
    schema_keys = _keys(OmegaConf.structured(SerrayConfig))
    yaml_keys = _keys(OmegaConf.load(BASE_CONFIG))
    assert schema_keys - yaml_keys == set(), "keys missing from configs/base.yaml"
    assert yaml_keys - schema_keys == set(), "keys in configs/base.yaml the schema does not have"


def test_base_yaml_values_are_the_schema_defaults():
    """base.yaml documents the defaults: its values are exactly the dataclass defaults."""
    schema = OmegaConf.to_container(OmegaConf.structured(SerrayConfig), resolve=False)
    yaml = OmegaConf.to_container(OmegaConf.load(BASE_CONFIG), resolve=False)
    assert yaml == schema


def test_public_keys_exist():
    cfg = load_config()
    for key in ("output_dir", "data.root", "encoder.name", "features.dir"):
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key


# ---------------------------------------------------------------- unknown keys


def test_unknown_override_key_suggests_close_one():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.rooot=/x"])
    msg = str(e.value)
    assert "data.rooot" in msg and "data.root" in msg
    assert "did you mean 'data.root'" in msg
    assert "command-line overrides" in msg


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  rooot: /x\nfeatures:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "data.rooot" in msg and "'data.root'" in msg
    # all unknown keys are listed, each with its suggestion
    assert "features.batchsize" in msg and "'features.batch_size'" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["encodr.name=fbank"])
    assert "encodr" in str(e.value)


def test_unknown_key_without_close_match_has_no_bogus_hint():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["zzzzzz=1"])
    assert "zzzzzz" in str(e.value)
    assert "did you mean" not in str(e.value)


# ---------------------------------------------------------------- types and values


@pytest.mark.parametrize("override, key", [
    ("features.batch_size=abc", "features.batch_size"),
    ("data.merge_excited=maybe", "data.merge_excited"),
    ("ray.num_cpus=1.5", "ray.num_cpus"),
    ("seed=x", "seed"),
    ("encoder.layers=3", "encoder.layers"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_file_names_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("features:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "features.batch_size" in str(e.value)


def test_wrong_type_for_a_section_names_the_section():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data=5"])
    assert "'data'" in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("data.sessions=[7]", "data.sessions"),
    ("data.sessions=[0,1]", "data.sessions"),
    ("features.batch_size=0", "features.batch_size"),
    ("features.concurrency=0", "features.concurrency"),
    ("encoder.device=tpu", "encoder.device"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.root"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_overrides_beat_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nfeatures:\n  batch_size: 4\n")
    cfg = load_config(f, ["seed=5"])
    assert cfg.seed == 5 and cfg.features.batch_size == 4
    assert cfg.features.concurrency == 1  # schema default fills what the file omits


def test_loaded_config_is_readonly():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.seed = 4


# ---------------------------------------------------------------- save / hash


def test_save_config_round_trips(tmp_path, sessions_overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", "encoder.layers=[0,2]", *sessions_overrides([1, 3]),
                             "seed=7", "ray.num_cpus=2"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml" and path.is_file()
    again = load_config(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    # resolved: the saved file holds no interpolations
    assert "${" not in path.read_text()


def test_section_hash_is_stable_and_sensitive():
    a = load_config(None, ["output_dir=/a"])
    b = load_config(None, ["output_dir=/b"])
    c = load_config(None, ["encoder.num_mel_bins=40"])
    assert section_hash(a, "encoder") == section_hash(b, "encoder")
    assert section_hash(a, "encoder") != section_hash(c, "encoder")


# ---------------------------------------------------------------- CLI


def test_cli_unknown_key_exits_2_with_one_error_line(capsys):
    rc = main(["config", "data.rooot=/x"])
    assert rc == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("serray config: error:")
    assert "data.rooot" in err and "data.root" in err


def test_cli_config_prints_resolved_yaml(capsys, tmp_path):
    rc = main(["config", f"output_dir={tmp_path}", "seed=11"])
    assert rc == 0
    out = capsys.readouterr().out
    cfg = OmegaConf.create(out)
    assert cfg.seed == 11 and cfg.features.dir == f"{tmp_path}/features"


def test_cli_bad_value_exits_2(capsys):
    assert main(["config", "data.sessions=[7]"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ---------------------------------------------------------------- value domains (_validate_domains)


@pytest.mark.parametrize("override, message", [
    ("pretrain.lr=-0.1", "pretrain.lr must be > 0, got -0.1"),
    ("finetune.lr=0", "finetune.lr must be > 0, got 0"),
    ("pretrain.batch_size=0", "pretrain.batch_size must be >= 1, got 0"),
    ("finetune.epochs=0", "finetune.epochs must be >= 1, got 0"),
    ("pretrain.num_workers=0", "pretrain.num_workers must be >= 1, got 0"),
    ("finetune.cpus_per_worker=0", "finetune.cpus_per_worker must be > 0, got 0"),
    ("pretrain.max_failures=-1", "pretrain.max_failures must be >= 0, got -1"),
    ("finetune.warmup_frac=1.0", "finetune.warmup_frac must be in [0, 1), got 1.0"),
    ("pretrain.warmup_frac=-0.1", "pretrain.warmup_frac must be in [0, 1), got -0.1"),
    ("pretrain.grad_clip=-1", "pretrain.grad_clip must be >= 0, got -1"),
    ("finetune.weight_decay=-0.01", "finetune.weight_decay must be >= 0, got -0.01"),
    ("finetune.head_dropout=1.0", "finetune.head_dropout must be in [0, 1), got 1.0"),
    ("adapter.num_layers=0", "adapter.num_layers must be >= 1, got 0"),
    ("adapter.ff_dim=0", "adapter.ff_dim must be >= 1, got 0"),
    ("adapter.num_heads=0", "adapter.num_heads must be >= 1, got 0"),  # used to be a ZeroDivisionError
    ("adapter.num_heads=5", "adapter.d_model (96) must be divisible by adapter.num_heads (5)"),
    ("features.max_seconds=0", "features.max_seconds must be > 0, got 0"),
    ("features.max_restarts=-1", "features.max_restarts must be >= 0, got -1"),
    ("features.resource_timeout_s=0", "features.resource_timeout_s must be > 0, got 0"),
    ("features.num_gpus=-1", "features.num_gpus must be >= 0, got -1"),
    ("features.min_seconds=200", "features.min_seconds (200.0) must be < features.max_seconds (120.0)"),
    ("serve.port=0", "serve.port must be in 1..65535, got 0"),
    ("serve.port=65536", "serve.port must be in 1..65535, got 65536"),
    ("serve.max_body_mb=0", "serve.max_body_mb must be > 0, got 0"),
    ("serve.max_seconds=nan", "serve.max_seconds must be > 0, got nan"),
    ("serve.batch_wait_timeout_s=-1", "serve.batch_wait_timeout_s must be >= 0, got -1"),
    ("serve.num_replicas=0", "serve.num_replicas must be >= 1, got 0"),
    ("encoder.sample_rate=0", "encoder.sample_rate must be >= 1000 (Hz), got 0"),
])
def test_numeric_domains_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert str(e.value).count("\n") == 0  # one bad key: one line


@pytest.mark.parametrize("overrides", [
    ["pretrain.lr=1e-6", "finetune.warmup_frac=0.0", "pretrain.max_failures=0", "pretrain.grad_clip=0",
     "adapter.num_layers=1", "adapter.ff_dim=1", "serve.port=1", "serve.max_queued_requests=-1"],
    ["serve.port=65535", "finetune.head_dropout=0.99", "serve.min_replicas=2", "serve.max_replicas=2",
     "serve.max_ongoing_requests=16", "features.min_seconds=0.025", "serve.min_seconds=0.025"],
])
def test_domain_boundaries_are_accepted(overrides):
    load_config(None, overrides)


def test_several_bad_keys_are_all_named():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain.lr=-1", "finetune.batch_size=0", "serve.min_replicas=3", "serve.max_replicas=2"])
    msg = str(e.value)
    assert "pretrain.lr" in msg and "finetune.batch_size" in msg and "serve.min_replicas (3) must be <= serve.max_replicas (2)" in msg


def test_transductive_pretrain_sessions_within_data_sessions(sessions_overrides):
    with pytest.raises(ConfigError, match=r"pretrain.sessions: \[5\] not in data.sessions \[1, 2\]"):
        load_config(None, [*sessions_overrides([1, 2]), "pretrain.per_fold=false", "pretrain.sessions=[1,5]"])
    load_config(None, [*sessions_overrides([1, 2]), "pretrain.per_fold=false", "pretrain.sessions=[1,2]"])
    load_config(None, [*sessions_overrides([1, 2])])  # per_fold: pretrain.sessions is not used


def _numeric_keys():
    """Every numeric leaf of the schema (optional ones too), as dotted keys."""
    import dataclasses
    import typing

    from serray.config import SerrayConfig

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            t = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(t) if a is not type(None)]
            base = args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t
            if dataclasses.is_dataclass(base):
                yield from walk(base, f"{prefix}{f.name}.")
            elif base in (int, float):
                yield f"{prefix}{f.name}"

    return list(walk(SerrayConfig, ""))


def test_every_numeric_key_has_a_domain_and_a_value_outside_it_is_one_line_naming_the_key():
    """Walks every numeric key of configs/base.yaml (and the schema's optional ones): each has a
    domain, and a value outside it is refused when the config loads, in one line that names the key.
    Before, features.num_cpus=0 was a ZeroDivisionError at featurization, serve.min_seconds=0 a 500 for
    a 399-sample clip, tune.num_samples=-1 a traceback when the sweep started, adapter.kmeans_decay=2
    and adapter.w_cluster=nan were accepted."""
    from serray.config import domain_of

    keys = _numeric_keys()
    assert len(keys) > 100
    missing = [k for k in keys if domain_of(k) is None]
    assert not missing, f"numeric keys without a domain: {missing}"
    for key in keys:
        bad = domain_of(key).outside
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={bad}"])
        msg = str(e.value)
        assert msg.count("\n") == 0 and key in msg, (key, msg)
    for key, value in (("adapter.w_cluster", "nan"), ("adapter.kmeans_decay", 2), ("features.num_cpus", 0),
                       ("serve.min_seconds", 0), ("tune.num_samples", -1), ("tune.reduction_factor", 1),
                       ("tune.grace_period", 0)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("overrides, needle", [
    (["data.sessions=[]", "finetune.folds=[]", "pretrain.sessions=[]"], "data.sessions must list at least one session"),
    (["pretrain.sessions=[7]"], "pretrain.sessions: [7] not in data.sessions"),
    (["synthetic.preset=loud"], "synthetic.preset must be demo or benchmark"),
    (["synthetic.min_duration=3", "synthetic.max_duration=2"], "synthetic.min_duration (3.0) must be <= synthetic.max_duration (2.0)"),
    (["synthetic.sample_rate=0"], "synthetic.sample_rate must be >= 1000 (Hz), got 0"),
    (["features.concurrency=3", "features.max_concurrency=2"], "features.concurrency (3) must be <= features.max_concurrency (2)"),
])
def test_cross_key_and_list_rules_are_checked_at_load(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_default_root_follows_the_layout(tmp_path):
    """`serray pipeline data.corpus=crema-d` (documented in docs/corpora.md) made the built-in CREMA-D
    tree under synthetic/IEMOCAP_full_release; each layout now has its release's name there."""
    from serray.config import load_config

    roots = {c: load_config(None, [f"output_dir={tmp_path}", f"data.corpus={c}"]).data.root
             for c in ("iemocap", "crema-d", "ravdess", "emodb", "csv")}
    assert roots == {"iemocap": f"{tmp_path}/synthetic/IEMOCAP_full_release", "crema-d": f"{tmp_path}/synthetic/CREMA-D",
                     "ravdess": f"{tmp_path}/synthetic/RAVDESS", "emodb": f"{tmp_path}/synthetic/emodb",
                     "csv": f"{tmp_path}/synthetic/csv/labels.csv"}
    given = load_config(None, [f"output_dir={tmp_path}", "data.corpus=crema-d", f"data.root={tmp_path}/mine"])
    assert given.data.root == f"{tmp_path}/mine"  # a root the user names is kept
