"""The recipe's keys as a user reaches them: a YAML file and ``serray pipeline`` on a release-shaped tree.

One run sets every key this recipe added (a front end that hears pitch, the data2vec EMA, epoch counts
and learning rates by inner cross-validation, leave-one-speaker-out folds); a second run in the same ``output_dir`` goes
back to leave-one-session-out, so the stored rows change fold group and must be encoded again.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

TINY = {"synthetic": {"utterances_per_dialog": 4, "dialogs_per_session": 2},
        "pretrain": {"epochs": 1}, "finetune": {"epochs": 2, "attention_dim": 16, "hidden_dim": 16},
        "adapter": {"d_model": 32, "ff_dim": 64, "num_layers": 1, "num_clusters": 4},
        "ray": {"progress_bars": False}, "tracking": {"enabled": False}}


def _run(*args) -> tuple[int, str]:
    from serray.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


@pytest.mark.slow
@pytest.mark.ray
def test_recipe_keys_from_a_yaml_file_and_a_protocol_change_in_the_same_output_dir(ray_session, tmp_path):
    import yaml

    out = tmp_path / "run"
    recipe = {**TINY, "encoder": {"name": "fbank_pitch"},
              "data": {"protocol": "leave_one_speaker_out", "sessions": [1, 2, 3, 4]},
              "pretrain": {**TINY["pretrain"], "sessions": [1, 2, 3, 4]},
              "adapter": {**TINY["adapter"], "ema_layers_only": True},
              "finetune": {**TINY["finetune"], "folds": [1], "epoch_selection": "inner_cv", "inner_cv_lrs": [0.001, 0.003]}}
    cfg_file = tmp_path / "recipe.yaml"
    cfg_file.write_text(yaml.safe_dump(recipe))
    rc, text = _run("pipeline", "--config", str(cfg_file), f"output_dir={out}")
    assert rc == 0, text
    metrics = json.loads((out / "finetune" / "metrics.json").read_text())
    assert metrics["evaluation"] == "leave-one-speaker-out" and metrics["group_name"] == "speaker"
    (fold,) = metrics["folds"]
    assert fold["fold"] == 1 and fold["n_test"] > 0
    sel = json.loads((out / "finetune" / "fold1" / "selection.json").read_text())
    assert sel["epoch_selection"] == "inner_cv" and sel["inner_cv"]["groups"] == [2, 3, 4]
    assert sel["val_speakers"] == ["Ses01_M", "Ses02_F", "Ses02_M"]  # every training speaker validated once
    assert sorted(float(k) for k in sel["inner_cv"]["lr_curves"]) == [0.001, 0.003]  # the rates from the file
    assert sel["lr"] == sel["inner_cv"]["lr"] in (0.001, 0.003)
    preds = pd.read_csv(out / "finetune" / "fold1" / "predictions.csv")
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("utt_id")
    assert set(manifest.loc[preds["utt_id"], "speaker"]) == {"Ses01_F"}  # one actor tested
    pool = json.loads((out / "pretrain" / "fold1" / "adapter" / "meta.json").read_text())
    assert "Ses01_F" not in pool["pool"]["speakers"] and "Ses01_M" in pool["pool"]["speakers"]
    assert pool["features"]["encoder"] == "fbank_pitch" and pool["features"]["dim"] == 82
    rc, shown = _run("models", "show", f"output_dir={out}", "data.protocol=leave_one_speaker_out",
                     "data.sessions=[1,2,3,4]", "pretrain.sessions=[1,2,3,4]", "finetune.folds=[1]",
                     "finetune.epoch_selection=inner_cv", "finetune.inner_cv_lrs=[0.001,0.003]", "encoder.name=fbank_pitch")
    entry = json.loads(shown)
    assert rc == 0 and entry["epoch_selection"] == "inner_cv" and "inner cross-validation" in entry["chosen_as"]

    # back to leave-one-session-out in the same output_dir: every row of sessions 1-2 moves to its session's group
    rc, text = _run("pipeline", "--config", str(cfg_file), f"output_dir={out}", "data.protocol=null",
                    "data.sessions=[1,2]", "pretrain.sessions=[1,2]", "finetune.epoch_selection=val", "finetune.inner_cv_lrs=[]")
    assert rc == 0, text
    stored = pd.concat([pd.read_parquet(p, columns=["utt_id"]).assign(group=int(p.parent.name.split("=")[1]))
                        for p in (out / "features").glob("session=*/*.parquet")])
    assert not stored["utt_id"].duplicated().any()
    wanted = manifest[manifest.index.str[4:5].isin(["1", "2"])]
    by_session = stored.set_index("utt_id")["group"]
    assert (by_session.loc[wanted.index] == wanted.index.str[4:5].astype(int)).all()
    metrics = json.loads((out / "finetune" / "metrics.json").read_text())
    assert metrics["evaluation"] == "leave-one-session-out"
    preds = pd.read_csv(out / "finetune" / "fold1" / "predictions.csv")
    assert set(manifest.loc[preds["utt_id"], "speaker"]) == {"Ses01_F", "Ses01_M"}  # the whole session
