"""Leave-one-corpus-out through the `serray` command: the built-in corpus in two layouts with their own
voices, each fold tests one corpus and trains and validates on the other only, one table row per corpus."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest


@pytest.mark.slow
@pytest.mark.ray
def test_leave_one_corpus_out_tests_each_corpus_on_a_model_that_never_heard_it(ray_session, tmp_path):
    from serray.cli import main

    run = tmp_path / "loco"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(["pipeline", f"output_dir={run}", "data.corpus=pooled", "data.protocol=leave_one_corpus_out",
                   "data.corpora=[{corpus: crema-d}, {corpus: emodb}]", "synthetic.dialogs_per_session=2",
                   "synthetic.utterances_per_dialog=6", "finetune.mode=none", "finetune.epochs=2",
                   "finetune.attention_dim=16", "finetune.hidden_dim=16", "ray.progress_bars=false",
                   "tracking.enabled=false"])
    text = buf.getvalue()
    assert rc == 0, text
    manifest = pd.read_parquet(run / "manifest.parquet")
    corpus_of = dict(zip(manifest["utt_id"], manifest["utt_id"].str.split("__").str[0]))
    assert set(corpus_of.values()) == {"crema-d", "emodb"}
    # the two members are different voices, not one corpus filed twice
    durations = manifest.assign(c=manifest["utt_id"].map(corpus_of)).groupby("c")["duration"].apply(lambda d: sorted(d.round(3)))
    assert durations["crema-d"] != durations["emodb"]
    metrics = json.loads((run / "finetune" / "metrics.json").read_text())
    assert metrics["evaluation"] == "leave-one-corpus-out" and metrics["group_name"] == "corpus"
    assert metrics["group_labels"] == {"1": "crema-d", "2": "emodb"}
    for fold, name in ((1, "crema-d"), (2, "emodb")):
        split = json.loads((run / "finetune" / f"fold{fold}" / "split.json").read_text())
        assert {corpus_of[u] for u in split["test"]} == {name}
        assert name not in {corpus_of[u] for u in split["train"] + split["val"]}  # never trained or validated on
    table = (run / "finetune" / "results.md").read_text()
    assert "| 1 (crema-d) |" in table and "| 2 (emodb) |" in table and "fold (test corpus)" in table
