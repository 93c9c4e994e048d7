"""Experiment tracking in MLflow (:mod:`serray.tracking`): the store a config names, the params it
logs (never a credential), a training loop's run continued on resume, and a dead server that only
warns. The sweep (tests/tune), the ablation (tests/train/test_finetune.py), the two-node cluster
(tests/cluster) and the main pipeline (tests/test_pipeline.py) check their runs on a real store."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from serray.config import load_config
from serray.errors import ConfigError
from serray.tracking import LoopRun, Tracker, config_params, loop_spec, resolve_uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_the_default_store_is_sqlite_under_output_dir(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    assert cfg.tracking.enabled and cfg.tracking.uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert resolve_uri("runs/x/store.db", "/out").startswith("sqlite:////") and resolve_uri("runs/x/store.db", "/o").endswith(
        "runs/x/store.db")
    assert resolve_uri("http://h:5000", "/out") == "http://h:5000"


def test_a_uri_that_names_no_store_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking.uri=runs/x must be a tracking server"):
        load_config(None, [f"output_dir={tmp_path}", "tracking.uri=runs/x"])
    with pytest.raises(ConfigError, match="tracking.timeout_s"):
        load_config(None, [f"output_dir={tmp_path}", "tracking.timeout_s=0"])


def test_params_are_the_resolved_config_without_credentials(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "features.dir=s3://AKIAXX:se/cr+et@bucket/feats?region=eu",
                             "tracking.uri=http://user:pa55@127.0.0.1:5000"])
    params = config_params(cfg)
    assert params["adapter.mask_ratio"] == "0.5" and params["finetune.folds"] == "[1, 2, 3, 4, 5]"
    assert params["features.dir"] == "s3://bucket/feats?region=eu"
    assert params["tracking.uri"] == "http://127.0.0.1:5000"
    text = json.dumps(params)
    assert "AKIAXX" not in text and "se/cr+et" not in text and "pa55" not in text


def test_a_resumed_loop_continues_its_run(tmp_path):
    """Epochs 0-1, a crash, then the resume's epoch 2: one run, its history 0, 1, 2, FINISHED; a loop
    with another key is another run."""
    from mlflow import MlflowClient

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "loops")
    spec = loop_spec(tracker.target(), "fold/abc/1", "fold 1", tags={"fold": 1}, params={"n_train": 10})
    first = LoopRun(spec)
    first.log({"loss": 1.0, "note": "text is skipped"}, 0)
    first.log({"loss": 0.5}, 1)
    first.close("FAILED")
    client = MlflowClient(tracker.uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    resumed = LoopRun(spec)
    resumed.log({"loss": 0.25}, 2)
    resumed.close()
    assert resumed.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"n_train": "10"} and run.data.tags["fold"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    other = LoopRun(loop_spec(tracker.target(), "fold/abc/2", "fold 2"))
    assert other.run_id not in (None, first.run_id)
    other.close()
    assert LoopRun(spec, rank=1).run_id is None  # only rank 0 logs


def test_an_unreachable_server_warns_once_and_is_off(caplog):
    tracker = Tracker(f"http://127.0.0.1:{_closed_port()}", "x", timeout_s=2)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="serray.tracking"):
        assert tracker.target() is None
        with tracker.run("k", "a run") as run_id:
            assert run_id is None
        tracker.log_metrics("some-id", {"a": 1.0})
    assert time.monotonic() - t0 < 10
    warnings = [r.getMessage() for r in caplog.records if r.name == "serray.tracking"]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "goes on" in warnings[0], warnings


@pytest.mark.ray
def test_a_run_with_an_unreachable_server_only_warns(featurized, tmp_path, caplog):
    """The LOSO fine-tuning writes every file as usual; the dead server costs one warning."""
    from serray.train.finetune import run_finetune

    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                             f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                             "finetune.mode=none", "finetune.folds=[1]", "finetune.epochs=1", "finetune.register=false",
                             f"tracking.uri=http://127.0.0.1:{_closed_port()}", "tracking.experiment=dead-server"])
    with caplog.at_level(logging.WARNING, logger="serray.tracking"):
        summary = run_finetune(cfg)
    assert (Path(cfg.finetune.dir) / "metrics.json").is_file() and len(summary["folds"]) == 1
    assert "mlflow_run_id" not in summary
    assert [r.name for r in caplog.records if r.name == "serray.tracking"] == ["serray.tracking"]


def test_curves_are_a_grid_a_person_reads_at_a_glance(tmp_path):
    """Ten panels: 4 + 4 + 2 (not one strip 3520 px wide)."""
    import matplotlib.image as mpimg

    from serray.train.pretrain import PRETRAIN_KEYS
    from serray.train.report import grid_shape, write_history

    history = [{"epoch": e, **{k: float(e) for k in PRETRAIN_KEYS}} for e in range(3)]
    path = write_history(history, tmp_path, PRETRAIN_KEYS, "ten panels")
    height, width = mpimg.imread(path).shape[:2]
    assert grid_shape(10) == (3, 4) and grid_shape(1) == (1, 1) and grid_shape(4) == (1, 4)
    assert width <= 1500 and height >= 800, (width, height)


def test_a_relative_sqlite_uri_is_a_store_where_the_command_runs(tmp_path, monkeypatch):
    """MLflow's own relative form ``sqlite:///runs/x/mlflow.db``: a store under the working directory
    (its directory made), not tracking turned off with an "unable to open database file"."""
    monkeypatch.chdir(tmp_path)
    uri = resolve_uri("sqlite:///runs/x/mlflow.db", "ignored")
    assert uri == "sqlite:///" + str(tmp_path / "runs" / "x" / "mlflow.db")
    tracker = Tracker(uri, "serray-test")
    assert tracker.client() is not None and tracker.enabled
    assert (tmp_path / "runs" / "x" / "mlflow.db").is_file()


def test_a_server_uri_with_credentials_probes_with_them_and_pickles_without(monkeypatch):
    """``http://user:secret@host`` : the probe sends MLflow's basic auth (before, urllib failed on the
    URI and tracking went off without a word about why), and the tracker, pickled into tuner.pkl with
    the Tune callback, holds no credential."""
    import base64
    import pickle
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "")  # recorded, so the value the code under test sets is undone after the test
        monkeypatch.delenv(key)
    seen = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        tracker = Tracker(f"http://alice:s3cr%40t@127.0.0.1:{port}", "serray-test", timeout_s=5.0)
        tracker._probe()
    finally:
        server.shutdown()
    assert tracker.uri == f"http://127.0.0.1:{port}"
    assert seen == [("/health", "Basic " + base64.b64encode(b"alice:s3cr@t").decode())]
    blob = pickle.dumps(tracker)
    assert b"s3cr" not in blob and b"alice" not in blob


def test_a_failing_tune_callback_setup_leaves_the_sweep_running(tmp_path, monkeypatch):
    """Ray's MLflowLoggerCallback.setup sets its trial table last: when setup fails (a store that
    refuses), the sweep's next callback calls must not raise AttributeError (they crashed the sweep)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from serray.tracking import _trial_callback

    tracker = Tracker("sqlite:///" + str(tmp_path / "mlflow.db"), "serray-test")
    assert tracker.client() is not None
    cb = _trial_callback(tracker, None, "trial/x", lambda config: dict(config), {})

    def refuse(self, *args, **kwargs):
        raise RuntimeError("the store refused")

    monkeypatch.setattr(MLflowLoggerCallback, "setup", refuse)
    cb.setup()
    assert not tracker.enabled
    class Trial:  # hashable, as Tune's trials are
        trial_id, config = "t1", {"a": 1}

    trial = Trial()
    cb.log_trial_start(trial)
    cb.log_trial_result(1, trial, {"training_iteration": 1, "val_ua": 0.5})
    cb.log_trial_end(trial)
