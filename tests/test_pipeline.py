"""The main job end to end through the CLI (``serray pipeline``) on a tiny corpus, and its rerun.

One module fixture runs the command once (inductive protocol, two folds, extra unlabelled audio in
the pre-training pool), then again: the rerun trains nothing and prints the same table.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

TINY = ["synthetic.utterances_per_dialog=4", "synthetic.dialogs_per_session=2", "pretrain.epochs=2",
        "finetune.epochs=2", "finetune.folds=[1,2]", "adapter.d_model=32", "adapter.ff_dim=64",
        "adapter.num_layers=1", "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=16",
        "adapter.ema_decay=0.5", "adapter.ema_decay_end=0.9",  # ~6 steps: a teacher that follows within the run
        "ray.progress_bars=false"]


def _extra_audio(root: Path) -> Path:
    """A LibriSpeech-like tree of unlabelled speech from two outside speakers."""
    rng = np.random.default_rng(0)
    for spk in ("100", "200"):
        d = root / spk / "1"
        d.mkdir(parents=True)
        for i in range(3):
            t = np.arange(int(16000 * 1.2)) / 16000
            sf.write(d / f"{spk}-1-{i:04d}.flac", 0.1 * np.sin(2 * np.pi * (120 + 40 * i) * t)
                     + 0.01 * rng.normal(size=len(t)), 16000)
    return root


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    from serray.cli import main

    out = tmp_path_factory.mktemp("pipeline")
    extra = _extra_audio(out / "librispeech")
    args = ["pipeline", f"output_dir={out / 'run'}", *TINY, f"pretrain.extra_audio=[{extra}]"]
    runs = []
    for _ in range(2):
        t0 = time.monotonic()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(args)
        runs.append({"rc": rc, "seconds": time.monotonic() - t0, "stdout": buf.getvalue()})
    return out / "run", runs


def test_pipeline_runs_end_to_end(pipeline, capsys):
    run, runs = pipeline
    assert [r["rc"] for r in runs] == [0, 0]
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    assert metrics["protocol"] == "inductive" and [f["fold"] for f in metrics["folds"]] == [1, 2]
    for f in metrics["folds"]:
        assert f["test_evaluations"] == 1 and f["fold"] not in f["pretrain_sessions"]
        assert 0 in f["pretrain_sessions"]  # the extra audio is in every fold's pre-training pool
    for fold in (1, 2):
        pool = json.loads((run / "pretrain" / f"fold{fold}" / "adapter" / "meta.json").read_text())["pool"]
        assert {"extra:100", "extra:200"} <= set(pool["speakers"])
        assert not [s for s in pool["speakers"] if s.startswith(f"Ses0{fold}")]
        history = json.loads((run / "pretrain" / f"fold{fold}" / "history.json").read_text())
        assert history[-1]["teacher_drift"] >= 0.5 * history[-1]["student_drift"] > 0
    entries = [json.loads(p.read_text()) for p in (run / "registry").glob("*/entry.json")]
    assert len(entries) == 1 and entries[0]["protocol"] == "inductive" and entries[0]["folds"] == [1, 2]


def test_rerun_skips_every_stage(pipeline):
    run, runs = pipeline
    assert runs[1]["seconds"] < runs[0]["seconds"] / 2
    assert len(list((run / "registry").glob("*/entry.json"))) == 1  # the same result is not registered twice


def test_terminal_shows_compact_progress_and_ray_lines_go_to_the_log(pipeline):
    """The terminal shows the stages, one line per epoch (fold, stage, k/n, metrics, time left) and the
    table; Ray's own lines (Tune's experiment boxes, dataset plans) are in output_dir/logs/ray.log."""
    run, runs = pipeline
    out = runs[0]["stdout"]
    assert "[1/3] corpus and manifest" in out and "[3/3] leave-one-session-out, folds [1, 2]" in out
    for fold in (1, 2):
        assert f"[fold {fold}] pre-train epoch 2/2: loss" in out
        assert f"[fold {fold}] fine-tune epoch 2/2: loss" in out and "val UA" in out
    assert "left)" in out and "| **mean ± sd** |" in out
    for noise in ("Configuration for experiment", "View detailed results here", "Reporting training result"):
        assert noise not in out
    log = (run / "logs" / "ray.log").read_text()
    assert "Configuration for experiment" in log  # Tune's box went to the log file
