"""Shared pytest fixtures for serray.

Fixture names are a contract other test modules rely on (keep them):

* ``ray_session``  (session) -- one local Ray for the whole test session (2 CPUs, dashboard on).
* ``synthetic_root`` (session) -- a small synthetic corpus in IEMOCAP_full_release layout.
* ``make_cfg``     (function) -- ``make_cfg(tmp_path, *overrides) -> cfg`` on ``synthetic_root``.
* ``featurized``   (session) -- manifest + fbank features of ``synthetic_root``; returns the cfg. With
  ``pretrain.use_unlabelled`` (the default) the manifest and features hold every labelled utterance,
  those outside the 4 classes with ``label == ""``; no extra audio (no ``session=0``).
  Treat its directories as read-only: copy them (``shutil.copytree``) before modifying anything.
* ``sessions_overrides`` (function) -- ``sessions_overrides([1])``: the overrides that restrict a
  run to some sessions (``data.sessions`` and the keys validated against it).
* ``tiny_hubert`` / ``tiny_hubert_group`` (session) -- random-init HuBERT checkpoints saved with
  ``save_pretrained`` (hidden size 32, 2 layers; layer-norm resp. group-norm feature extractor).
* ``mlflow_server`` (session) -- a real ``mlflow server`` (SQLite backend) on 127.0.0.1, its URI;
  stopped at the end of the session.

Nothing here reads ``$CI``: the configs set ``ray.progress_bars=false`` explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never touch the network from tests (model loading is by local path only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

#: Synthetic corpus size used by the shared fixtures: 5 sessions x 4 dialogs x 6 utterances.
SYNTH_UTTERANCES_PER_DIALOG = 6

RAY_ENV_VARS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (``num_cpus=2``, dashboard default on)."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        # address="local": never join a `ray start` head left running on the machine
        ray.init(address="local", num_cpus=2, runtime_env={"env_vars": dict(RAY_ENV_VARS)})
        started = True
    DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # Serve never started, or already gone
            pass
        ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic IEMOCAP_full_release tree (seed 0, 6 utterances per dialog, 120 in all)."""
    from serray.data.synthetic import make_corpus

    base = tmp_path_factory.mktemp("synthetic")
    return make_corpus(base / "IEMOCAP_full_release", seed=0,
                       utterances_per_dialog=SYNTH_UTTERANCES_PER_DIALOG)


def _make_cfg(root: Path, tmp_path, *overrides: str):
    from serray.config import load_config

    # unit tests run the fbank front end (80 dims, no openSMILE: fast and independent of it); the shipped
    # default (egemaps) is what the CLI tests of the main path run (tests/test_pipeline.py)
    return load_config(None, [f"output_dir={tmp_path}", f"data.root={root}", "ray.progress_bars=false",
                              "encoder.name=fbank", *overrides])


def _sessions_overrides(sessions) -> list:
    """Overrides restricting a run to ``sessions``: ``data.sessions`` plus every schema key that must
    stay a subset of it (``finetune.folds``, ``pretrain.sessions``) when the schema has it."""
    from omegaconf import OmegaConf

    from serray.config import SerrayConfig

    value = "[" + ",".join(str(int(s)) for s in sessions) + "]"
    out = [f"data.sessions={value}"]
    schema = OmegaConf.structured(SerrayConfig)
    for key in ("finetune.folds", "pretrain.sessions"):
        if OmegaConf.select(schema, key, default="__missing__") != "__missing__":
            out.append(f"{key}={value}")
    return out


@pytest.fixture
def sessions_overrides():
    """``sessions_overrides([1])`` -> ``["data.sessions=[1]", "finetune.folds=[1]", ...]`` for make_cfg/CLI."""
    return _sessions_overrides


@pytest.fixture
def make_cfg(synthetic_root):
    """``make_cfg(tmp_path, *overrides)``: base.yaml + output_dir, data.root=synthetic_root, no progress bars."""

    def make(tmp_path, *overrides: str):
        return _make_cfg(synthetic_root, tmp_path, *overrides)

    return make


@pytest.fixture(scope="session")
def featurized(ray_session, synthetic_root, tmp_path_factory):
    """Manifest (every labelled utterance: ``pretrain.use_unlabelled``) + fbank featurization of
    ``synthetic_root`` in a session tmp dir; returns the cfg.

    The cfg's ``data.manifest`` and ``features.dir`` are shared by every test: do not modify them.
    """
    from serray.data.features.featurize import featurize
    from serray.data.corpora.base import write_manifest
    from serray.data.corpora.iemocap import build_manifest

    out = tmp_path_factory.mktemp("featurized")
    cfg = _make_cfg(synthetic_root, out)
    report = build_manifest(cfg.data.root, cfg.data.sessions, cfg.data.merge_excited,
                            keep_unlabelled=cfg.pretrain.use_unlabelled)
    write_manifest(report.kept, cfg.data.manifest)
    summary = featurize(cfg)
    assert summary["written"] == len(report.kept), summary  # 4-class and unlabelled rows
    labelled = report.kept[report.kept["label"] != ""]
    assert cfg.pretrain.use_unlabelled and len(labelled) < len(report.kept)
    assert summary["labelled_rows_per_session"] == {str(k): int(v) for k, v in labelled.groupby("session").size().items()}
    return cfg


def _save_tiny_hubert(path: Path, norm: str) -> Path:
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(32,) * 7, feat_extract_norm=norm)
    if norm == "layer":
        kwargs["do_stable_layer_norm"] = True
    HubertModel(HubertConfig(**kwargs)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_hubert(tmp_path_factory) -> Path:
    """A random-init HuBERT (layer-norm feature extractor, hidden 32, 2 layers) saved to a local dir."""
    return _save_tiny_hubert(tmp_path_factory.mktemp("tiny_hubert_layer"), "layer")


@pytest.fixture(scope="session")
def tiny_hubert_group(tmp_path_factory) -> Path:
    """The same tiny HuBERT with a group-norm feature extractor (the *base* checkpoints' kind)."""
    return _save_tiny_hubert(tmp_path_factory.mktemp("tiny_hubert_group"), "group")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with a SQLite backend and local artifacts on a free 127.0.0.1 port; yields
    ``http://127.0.0.1:<port>``; stopped (and waited for) at the end of the session."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    base = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    log = (base / "server.log").open("w")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                             "--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # 82 s measured at load average 13 on 2 cores
    try:
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{(base / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
