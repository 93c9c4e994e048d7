"""What a run's provenance record names: the code of every fold, the encoder's revision and weights,
and a command line with no secret in it (tests/test_pipeline.py checks the record of a whole run)."""

from __future__ import annotations

import json
import shutil
import sys

from serray import provenance


def test_the_command_line_is_recorded_without_credentials(featurized, monkeypatch):
    """``features.dir=s3://KEY:SECRET@...`` on the command line reached every metrics.json, registry
    entry and MLflow artifact verbatim."""
    monkeypatch.setattr(sys, "argv", ["/usr/bin/serray", "pipeline",
                                      "features.dir=s3://AKIDPROV:SECRETPROV@bucket/f?secret_key=SKPROV&region=eu",
                                      "tracking.uri=http://alice:PWPROV@mlflow:5000",
                                      "pretrain.dir=s3://AKIDPROV:se(cr)PROV@bucket/x",
                                      "tracking.uri=https://bob:p,ss;PWPROV2@mlflow.corp:5000", "seed=3"])
    record = provenance.collect(featurized, [1])
    text = json.dumps(record["argv"])
    assert record["argv"][:2] == ["serray", "pipeline"] and record["argv"][-1] == "seed=3"
    for secret in ("AKIDPROV", "SECRETPROV", "SKPROV", "PWPROV", "alice", "se(cr)", "PWPROV2", "bob"):
        assert secret not in text, record["argv"]
    assert "s3://***@bucket/f" in text and "region=eu" in text


def test_a_reused_fold_keeps_the_code_that_trained_it(featurized):
    """Provenance named the current commit for folds an earlier commit trained (reused by a rerun)."""
    now = provenance.git_state()
    old = {"git": {"commit": "0" * 40, "dirty": False}, "packages": {"torch": "0.1"}, "created": "2026-01-01T00:00:00"}
    same = provenance.code_record()
    record = provenance.collect(featurized, [1, 2], None, [{"fold": 1, "code": old}, {"fold": 2, "code": same}])
    assert record["fold_code"]["1"]["git"]["commit"] == "0" * 40
    assert record["fold_code"]["2"]["git"] == now
    assert record["folds_other_code"] == [1]


def test_the_encoder_revision_and_weights_are_recorded(tiny_hubert, tmp_path):
    """A Hugging Face encoder: its hub revision (None for a local directory) and a hash of its files,
    which changes with the weights; the name without the machine's path. A built-in encoder: its name."""
    rec = provenance.encoder_record(str(tiny_hubert))
    assert rec["name"] == ".../" + tiny_hubert.name and str(tmp_path.anchor + "tmp") not in rec["name"]
    assert rec["revision"] is None and len(rec["weights_sha256"]) == 64
    assert provenance.encoder_record(str(tiny_hubert)) == rec  # deterministic
    other = shutil.copytree(tiny_hubert, tmp_path / "copy")
    weights = next(p for p in other.iterdir() if p.suffix in (".safetensors", ".bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert provenance.encoder_record(str(other))["weights_sha256"] != rec["weights_sha256"]
    assert provenance.encoder_record("egemaps") == {"name": "egemaps", "revision": None, "weights_sha256": None}
