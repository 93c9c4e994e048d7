"""A result depends on the corpus, the config and the seed only.

Not on how the featurization cut the corpus into blocks and files (how many encoder actors, how many
utterances per forward), and not on what ran before a run in the same process (which arms an
ablation lists). Before these tests, training read rows in the order the feature files held them:
the same held-out corpus gave fold-1 UA 55.1 or 62.8 depending on ``features.batch_size``.
"""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from serray.config import load_config

TINY = ["pretrain.epochs=2", "finetune.epochs=3", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=8", "finetune.attention_dim=16", "finetune.hidden_dim=16", "ray.progress_bars=false"]


def _cfg(featurized, out, *overrides):
    return load_config(None, [f"output_dir={out}", f"data.root={featurized.data.root}", "encoder.name=fbank",
                              f"data.manifest={featurized.data.manifest}", *TINY, *overrides])


def _stored_order(features_dir) -> list:
    from serray.data.features.featurize import parquet_files

    return [u for s in range(1, 6) for f in parquet_files(features_dir, s)
            for u in pq.read_table(f, columns=["utt_id"]).column("utt_id").to_pylist()]


def _fold(cfg, fold=1):
    from serray.train.finetune import run_fold

    res = run_fold(cfg, fold)
    preds = pd.read_csv(f"{cfg.finetune.dir}/fold{fold}/predictions.csv")
    return res, preds


@pytest.mark.slow
@pytest.mark.ray
def test_features_written_two_ways_give_identical_fold_results(featurized, tmp_path):
    """One corpus featurized with 2 utterances per forward by one encoder actor, and with 16 per forward
    by the all-core pool: the files hold the rows in another order, the fold results are identical
    (pre-training and fine-tuning, every metric and every prediction)."""
    from serray.data.features.featurize import featurize

    cfgs = {}
    for name, how in (("small", ["features.batch_size=2", "features.max_concurrency=1"]),
                      ("large", ["features.batch_size=16"])):
        cfgs[name] = _cfg(featurized, tmp_path / name, *how)
        featurize(cfgs[name])
    orders = {name: _stored_order(cfg.features.dir) for name, cfg in cfgs.items()}
    assert sorted(orders["small"]) == sorted(orders["large"])
    assert orders["small"] != orders["large"], "the two featurizations wrote the rows in the same order: no test"
    # streamed sets (above features.cache_max_mb) come in one seeded order too, whatever the files
    from serray.data.features.training import STREAM_KEY, training_data

    streamed = [[r["utt_id"] for r in training_data(cfg.features.dir, [2, 3], None, 0.0, seed=7).ray_dataset()
                 .select_columns(["utt_id", STREAM_KEY]).take_all()] for cfg in cfgs.values()]
    assert streamed[0] == streamed[1] and sorted(streamed[0]) != streamed[0]  # the same shuffle, not sorted
    (res_a, preds_a), (res_b, preds_b) = (_fold(cfgs[n]) for n in ("small", "large"))
    for key in ("ua", "wa", "macro_f1", "val_ua", "val_loss", "best_epoch"):
        assert res_a[key] == res_b[key], key
    assert [h["loss"] for h in res_a["history"]] == [h["loss"] for h in res_b["history"]]
    pd.testing.assert_frame_equal(preds_a, preds_b)


@pytest.mark.ray
def test_an_arm_alone_and_beside_other_arms_gives_identical_numbers(featurized, tmp_path):
    """The random_init arm of one (seed, fold) run alone, and after the none and full arms in the same
    process: the same result (every run seeds its generators from its own seed, fold and stage)."""
    from serray.train.ablation import arm_config, run_unit

    common = ["finetune.folds=[2]", "ablate.seeds=1", f"features.dir={featurized.features.dir}"]
    alone = _cfg(featurized, tmp_path / "alone", "ablate.arms=[random_init]", *common)
    beside = _cfg(featurized, tmp_path / "beside", "ablate.arms=[none,full,random_init]", *common)
    run_unit(alone, 0, 2)
    run_unit(beside, 0, 2)
    results = []
    for cfg in (alone, beside):
        acfg = arm_config(cfg, "random_init", "finetune", 1.0, 0)
        results.append(_fold_result(acfg, 2))
    (res_a, preds_a), (res_b, preds_b) = results
    for key in ("ua", "val_ua", "val_loss", "best_epoch"):
        assert res_a[key] == res_b[key], key
    pd.testing.assert_frame_equal(preds_a, preds_b)


def _fold_result(cfg, fold):
    import json
    from pathlib import Path

    d = Path(cfg.finetune.dir) / f"fold{fold}"
    return json.loads((d / "fold_result.json").read_text()), pd.read_csv(d / "predictions.csv")


@pytest.mark.ray
def test_test_evaluations_counts_every_scoring_of_the_test_split(featurized, tmp_path):
    """test_evaluations was the literal 1, so the tests asserting it could not fail. It now counts the
    scorings recorded in the fold's ledger: a fold trained without its test (a sweep trial) has none,
    its first scoring makes 1, and scoring it again is visible as 2."""
    from serray.train.finetune import TEST_LEDGER, run_fold, test_fold

    cfg = _cfg(featurized, tmp_path, f"features.dir={featurized.features.dir}", "finetune.mode=none",
               "finetune.epochs=2")
    sel = run_fold(cfg, 3, score_test=False)
    fold_dir = tmp_path / "finetune" / "fold3"
    assert "ua" not in sel and not (fold_dir / TEST_LEDGER).exists() and not (fold_dir / "predictions.csv").exists()
    first = test_fold(cfg, 3)
    assert first["test_evaluations"] == 1 and first["val_ua"] == sel["val_ua"]
    again = test_fold(cfg, 3)
    assert again["test_evaluations"] == 2 and again["ua"] == first["ua"]
    assert len((fold_dir / TEST_LEDGER).read_text().splitlines()) == 2


@pytest.mark.ray
def test_a_torn_fold_result_is_redone_not_a_traceback(featurized, tmp_path, caplog):
    """fold_result.json was read with a bare json.loads: a truncated one broke every rerun."""
    import logging

    from serray.train.finetune import FOLD_RESULT, fold_done, run_fold

    cfg = _cfg(featurized, tmp_path, f"features.dir={featurized.features.dir}", "finetune.mode=none",
               "finetune.epochs=2")
    first = run_fold(cfg, 4)
    path = tmp_path / "finetune" / "fold4" / FOLD_RESULT
    assert fold_done(cfg, 4)["ua"] == first["ua"]
    path.write_text(path.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="serray.train.finetune"):
        assert fold_done(cfg, 4) is None
    assert "not valid JSON" in caplog.text
    again = run_fold(cfg, 4)  # training resumes from its last checkpoint; the test is scored again, and counted
    assert again["ua"] == first["ua"] and again["test_evaluations"] == 2
    assert fold_done(cfg, 4)["ua"] == first["ua"]


def test_training_holds_the_features_against_a_concurrent_featurization(featurized, tmp_path):
    """Pre-training and fine-tuning read features.dir with no guard: a re-featurization at the same
    time could change the rows under them. Now training takes a shared lock (this machine) and
    compares the feature metadata before and after (any machine)."""
    import shutil

    from serray import storage
    from serray.data.features.featurize import META_FILE, featurize
    from serray.errors import DataError
    from serray.train.finetune import run_fold
    from serray.data.features.featurize import reading_features

    feats = tmp_path / "features"
    shutil.copytree(featurized.features.dir, feats)
    cfg = _cfg(featurized, tmp_path, f"features.dir={feats}", "finetune.mode=none", "finetune.epochs=1")
    with storage.lock(str(feats), wait=False, what="serray featurize"):  # a featurization is writing
        with pytest.raises(DataError, match="is in use by a `serray featurize` writing it"):
            run_fold(cfg, 2)
    with reading_features(cfg):  # a training is reading: a featurization is refused
        with pytest.raises(DataError, match="or training that reads it"):
            featurize(cfg, overwrite=True)
    with pytest.raises(DataError, match="changed while this run read them"):
        with reading_features(cfg):
            meta = feats / META_FILE
            meta.write_text(meta.read_text().replace("{", '{"touched": 1, ', 1))  # another machine re-featurized
