"""Storage URIs (``serray.storage``): features, checkpoints and the registry on S3.

An S3-compatible server (moto, on 127.0.0.1) stands in for object storage: the same pyarrow
S3FileSystem code talks to it as to AWS. Credentials and the endpoint travel in the URI, so Ray
workers reach it without extra environment.
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from serray import storage
from serray.config import load_config
from serray.errors import ConfigError, DataError

BUCKET = "serray-test"


@pytest.fixture(scope="module")
def s3_base():
    """``s3://key:secret@serray-test/<prefix>?endpoint_override=127.0.0.1:<port>&scheme=http``."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    base = f"s3://testing:testing@{BUCKET}/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=f"{host}:{port}", scheme="http",
                      region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
    yield base
    server.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_uri_paths_keep_their_form():
    u = "s3://k:s@b/runs?endpoint_override=h:1&scheme=http"
    assert storage.join(u, "features", "x.json") == "s3://k:s@b/runs/features/x.json?endpoint_override=h:1&scheme=http"
    assert storage.name(storage.join(u, "fold1")) == "fold1"
    assert storage.describe(u) == "s3://b/runs"  # no credentials, no query in messages
    assert storage.join("/tmp/a", "b") == "/tmp/a/b" and not storage.is_uri("/tmp/a")
    assert storage.absolute("rel/dir").startswith("/") and storage.absolute(u) == u


def test_file_uri_is_the_local_filesystem(tmp_path):
    uri = f"file://{tmp_path}/store"
    storage.write_text(storage.join(uri, "a", "b.txt"), "hello")
    assert (tmp_path / "store" / "a" / "b.txt").read_text() == "hello"
    assert storage.find_files(uri, ".txt") == [f"file://{tmp_path}/store/a/b.txt"]


def test_s3_read_write_list_upload_download(s3_base, cache, tmp_path):
    root = storage.join(s3_base, "unit")
    storage.write_text(storage.join(root, "a", "x.json"), '{"v": 1}')
    assert json.loads(storage.read_text(storage.join(root, "a", "x.json"))) == {"v": 1}
    assert storage.is_file(storage.join(root, "a", "x.json")) and storage.is_dir(storage.join(root, "a"))
    assert [storage.name(p) for p in storage.listdir(root)] == ["a"]

    local = tmp_path / "src"
    (local / "m").mkdir(parents=True)
    (local / "m" / "w.bin").write_bytes(b"\x00\x01\x02")
    with storage.staged(storage.join(root, "entry")) as d:
        (d / "m").mkdir()
        (d / "m" / "w.bin").write_bytes(b"\x00\x01\x02")
        assert not storage.exists(storage.join(root, "entry", "m", "w.bin"))  # uploaded at the end only
    assert storage.read_bytes(storage.join(root, "entry", "m", "w.bin")) == b"\x00\x01\x02"
    assert [storage.name(f) for f in storage.find_files(root, ".bin")] == ["w.bin"]

    copy = storage.local_copy(storage.join(root, "entry"))
    assert copy.is_relative_to(cache) and (copy / "m" / "w.bin").read_bytes() == b"\x00\x01\x02"
    storage.remove(storage.join(root, "entry"))
    assert not storage.exists(storage.join(root, "entry"))
    with pytest.raises(DataError, match="does not exist"):
        storage.local_copy(storage.join(root, "entry"))


def test_staged_upload_skipped_on_error(s3_base):
    target = storage.join(s3_base, "failed")
    with pytest.raises(RuntimeError):
        with storage.staged(target) as d:
            (d / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not storage.exists(target)


@pytest.mark.parametrize("key", ["output_dir", "data.root", "tune.dir"])
def test_local_only_keys_refuse_uris(tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key}=s3://b/x must be a local path"):
        load_config(None, [f"output_dir={tmp_path}", f"{key}=s3://b/x"])


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_stages_on_s3(featurized, s3_base, cache, tmp_path):
    """featurize -> pretrain -> fine-tune (one fold) -> register -> load for serving, all stored on S3."""
    from serray.data.features.featurize import featurize, read_meta
    from serray.data.features.training import training_data
    from serray.predict import Predictor
    from serray.train.registry import list_entries, model_source, resolve_model
    from serray.train.finetune import run_finetune
    from serray.train.pretrain import adapter_path, run_pretrain

    run = storage.join(s3_base, "e2e")
    out = tmp_path / "local"
    cfg = load_config(None, [
        f"output_dir={out}", f"data.root={featurized.data.root}", "encoder.name=fbank", f"data.manifest={featurized.data.manifest}",
        "ray.progress_bars=false", "data.sessions=[1,2]", "pretrain.sessions=[1,2]", "finetune.folds=[1]",
        f"features.dir={storage.join(run, 'features')}", f"pretrain.dir={storage.join(run, 'pretrain')}",
        f"finetune.dir={storage.join(run, 'finetune')}",
        f"registry.dir={storage.join(run, 'registry')}", "features.cache_max_mb=0",  # stream from S3, no cache
        "pretrain.epochs=1", "finetune.epochs=2", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=32"])
    assert adapter_path(cfg, 1) == storage.join(run, "pretrain", "fold1", "adapter")  # per fold, query kept last
    fs, bucket_path = storage.resolve(run)

    summary = featurize(cfg)
    n = sum(summary["rows_per_session"].values())
    assert n == summary["written"] and set(summary["rows_per_session"]) == {"1", "2"}
    keys = [i.path for i in fs.get_file_info(pafs.FileSelector(bucket_path, recursive=True))
            if i.type == pafs.FileType.File]
    assert any("/features/session=1/" in k and k.endswith(".parquet") for k in keys), keys
    assert read_meta(cfg.features.dir)["num_rows"] == n
    data = training_data(cfg.features.dir, [1, 2], cache_max_mb=0)
    assert data.mode == "stream" and len(data) == n  # Ray Data reads the URI (lazy, shuffled path)
    assert featurize(cfg)["written"] == 0  # resumable on S3 too

    pre = run_pretrain(cfg, 1)  # fold 1's adapter: session 2 only, streamed from S3
    assert not pre["reused"] and storage.is_file(storage.join(run, "pretrain", "fold1", "adapter", "state.pt"))
    assert pre["pool"]["sessions"] == [2]
    ckpts = storage.find_files(storage.join(run, "pretrain", "fold1", "ray"), "state.pt")
    assert ckpts, "the training loop wrote no checkpoint to S3"
    assert run_pretrain(cfg, 1)["reused"]  # the stage is skipped: its output on S3 matches the config

    res = run_finetune(cfg)
    assert [f["fold"] for f in res["folds"]] == [1]
    metrics = json.loads(storage.read_text(storage.join(run, "finetune", "metrics.json")))
    assert metrics["mean"]["ua"] == pytest.approx(res["mean"]["ua"])
    for name in ("fold1/fold_result.json", "fold1/model/state.pt", "fold1/predictions.csv", "predictions.csv",
                 "confusion_matrix.png"):
        assert storage.is_file(storage.join(run, "finetune", *name.split("/"))), name

    entries = list_entries(cfg.registry.dir)
    assert len(entries) == 1 and entries[0]["path"].startswith("s3://")
    model, entry = resolve_model(cfg)
    assert model.is_relative_to(cache) and entry["id"] == entries[0]["id"]
    assert model_source(entry) == storage.join(entries[0]["path"], "model")  # what a Serve replica downloads
    preds = Predictor.from_checkpoint(model).predict_parquet(storage.find_files(storage.join(run, "features", "session=1"), ".parquet"))
    assert len(preds) == summary["rows_per_session"]["1"]
    # nothing of those stages was written under the local output_dir
    assert not any((out / d).exists() for d in ("features", "pretrain", "finetune", "registry"))
