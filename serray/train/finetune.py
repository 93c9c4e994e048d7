"""SER fine-tuning and the paper's evaluation: SAP + classifier, one fold per held-out group of the
corpus's protocol (IEMOCAP: 5-fold leave-one-session-out).

Each fold trains on the other groups, selects the epoch on a validation part held out from them
(``finetune.val_split``: whole speakers by default, so validation shares no speaker with training;
or an official development set), and scores its held-out test group exactly once, with the selected
checkpoint. The splits, the pre-training pool and the audit live in :mod:`serray.train.folds`.

Protocol (see ``docs/protocol.md``): with ``pretrain.per_fold=true`` (*inductive*, the default) the
fold's adapter is pre-trained on the fold's pool only (:mod:`serray.train.pretrain`), and every arm
of a comparison (no adapter, random init, pre-trained) normalises its input with the statistics of
that same pool. :func:`audit_fold` asserts in code that no test-session speaker reaches training,
validation, pre-training or the statistics, and aborts the run when one does.

Folds run as parallel Ray Tune trials; each trial pre-trains the fold's adapter (if it is missing)
and fine-tunes it, both with the shared loop (:mod:`serray.train.loop`). A finished fold is kept
(``fold_result.json``) and an interrupted one resumes from its latest Ray Train checkpoint, so
rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from serray import provenance, storage
from serray.config import OPERATIONAL_KEYS, as_dict, section_hash, to_yaml
from serray.data.features.featurize import check_features, feature_identity, reading_features
from serray.data.corpora.base import LABELS
from serray.errors import DataError
from serray.train.protocol import evaluation, protocol  # noqa: F401  (protocol: re-exported for the stages)
from serray.train.loop import fit, run_seed, steps_per_epoch
from serray.train.tasks import task_name, task_of
from serray.train.tasks.categorical import SELECTION_KEY, FinetuneTask  # noqa: F401  (FinetuneTask: re-exported)
from serray.train.folds import (audit_fold, fold_datasets, fold_split, labelled_rows, plan_fold, pool_sessions, split_digest,  # noqa: F401
                                split_fold, subsample_labels, task_split, training_groups)  # (re-exported: the stages' public names)
from serray.train.pretrain import adapter_path, check_adapter, fold_body, run_pretrain, uses_pretraining  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FOLD_RESULT = "fold_result.json"
# ---------------------------------------------------------------- protocol


#: finetune keys that do not change a fold's result: which folds run, how many at once, and whether the
#: finished run is registered (the ablation's main arm, registering nothing, reuses `serray pipeline`'s folds)
FOLD_NEUTRAL_KEYS = ("folds", "max_concurrent_folds", "register")


def finetune_hash(cfg) -> str:
    """What makes two fine-tuning runs the same (the adapter and pre-training count unless mode=none)."""
    from serray.train.protocol import class_keys, grouping_keys

    keys = ["encoder", "finetune", "seed", "data.merge_excited", "pretrain.per_fold", *grouping_keys(cfg),
            *class_keys(cfg)]
    if cfg.finetune.mode != "none":
        keys += ["adapter", "pretrain"]
    unset = () if cfg.finetune.get("inner_cv_lrs") else ("inner_cv_lrs",)  # (hashes from before the key unchanged)
    return section_hash(cfg, *keys, exclude=OPERATIONAL_KEYS + FOLD_NEUTRAL_KEYS + unset)


# ---------------------------------------------------------------- one fold


def _class_weights(labels: pd.Series, how: str, classes: Sequence[str] = LABELS) -> Optional[List[float]]:
    if how == "none":
        return None
    counts = Counter(labels)
    n, k = len(labels), len(classes)
    return [n / (k * counts[l]) if counts.get(l) else 0.0 for l in classes]


def _model_kwargs(cfg, feat_meta: dict, body: Optional[Dict[str, Any]], classes: Sequence[str]) -> Dict[str, Any]:
    return {"input_dim": feat_meta["dim"], "num_classes": len(classes), "num_input_layers": feat_meta["num_layers"],
            "body": body, "freeze_body": cfg.finetune.mode == "frozen",
            "attention_dim": cfg.finetune.attention_dim, "hidden_dim": cfg.finetune.hidden_dim,
            "dropout": cfg.finetune.head_dropout}


def run_fold(cfg, fold: int, report_to_tune: bool = False, report_pretrain: bool = False,
             score_test: bool = True, tracking: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Pre-train (if needed), train, select and test one leave-one-session-out fold (see
    :func:`_run_fold`), holding ``features.dir`` against a concurrent re-featurization."""
    with reading_features(cfg):
        return _run_fold(cfg, fold, report_to_tune, report_pretrain, score_test, tracking)


def _run_fold(cfg, fold: int, report_to_tune: bool = False, report_pretrain: bool = False,
              score_test: bool = True, tracking: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Pre-train (if needed), train, select and test one leave-one-session-out fold; write its
    directory; return its result.

    ``report_to_tune``: every fine-tuning epoch is a Ray Tune result (inside a trial: ASHA, progress);
    ``report_pretrain``: so is every pre-training epoch (progress lines only; a sweep's scheduler
    needs validation metrics in every result, so sweeps leave it off). ``score_test=False`` stops
    after the epoch is selected (``selection.json`` and ``model/``, no test score): a nested sweep's
    trials, whose one chosen model per fold is scored later by :func:`test_fold`. ``tracking``: the
    MLflow run the fold's runs (pre-training, fine-tuning) nest under (None: untracked).
    """
    from serray.tracking import Tracker, loop_spec, stage_key, test_scores

    feat_meta = check_features(cfg)
    features = feature_identity(feat_meta)
    body = fold_body(cfg, fold, feat_meta, report_pretrain, tracking)  # pre-trained first if needed (serray.train.pretrain)
    tcfg, fhash = cfg.finetune, finetune_hash(cfg)
    fold_dir = _fold_path(cfg, fold)
    plan = plan_fold(cfg, fold, feat_meta, body.pool)  # split, statistics, leakage audit, classes (serray.train.folds)
    split, audit, classes = plan.split, plan.audit, plan.classes
    model = _model_kwargs(cfg, feat_meta, body.kwargs, classes)
    task = task_of(cfg)  # finetune.task: the heads, targets and selection metric (serray.train.tasks)
    task_keys, task_cls = task.loop_config(cfg, split, model), task.loop_task
    track = loop_spec(tracking, stage_key("fold", fhash, fold_dir), f"fold {fold}",
                      tags={"stage": "finetune", "fold": fold, "mode": tcfg.mode},
                      params={"fold": fold, "test_session": fold, "n_train": len(split["train"]),
                              "n_val": len(split["val"]), "val_speakers": sorted(set(split["val"]["speaker"]))})
    loop_config = {
        "seed": cfg.seed, "run_seed": run_seed(cfg.seed, fold, "finetune"), "fold": fold, "mode": tcfg.mode,
        "branch": tcfg.branch, "init": tcfg.init, "config_yaml": to_yaml(cfg), "config_hash": fhash,
        "features": features,
        "feature_stats": [a.tolist() for a in plan.stats],
        "model": model, "audit": audit,
        "init_from": storage.absolute(body.adapter) if body.adapter else "",
        "class_weights": _class_weights(split["train"]["label"], tcfg.class_weighting, classes),
        "labels": list(classes),
        **{k: v for k, v in as_dict(tcfg).items() if k in TRAIN_KEYS},
        "steps_per_epoch": steps_per_epoch(len(split["train"]), tcfg.batch_size, tcfg.num_workers),
        "fault_marker": storage.join(fold_dir, "fault_injected.marker"),
        "tracking": track,
    }
    loop_config.update(task_keys)
    loop_config["select_metric"] = loop_config.get("select_metric") or "val_ua"
    ray_dir = storage.join(storage.absolute(tcfg.dir), "ray")
    inner = None
    if epoch_selection(cfg) == "inner_cv":  # the epoch count from the inner folds, then every training speaker trains
        inner = _inner_cv(cfg, fold, split, loop_config, task_cls, ray_dir, f"fold{fold}-{fhash[:8]}")
        loop_config.update(cv_curve=inner["curve"], stop_epoch=inner["epoch"], lr=inner.get("lr", loop_config["lr"]))
    result = fit(task_cls, loop_config, plan.datasets, tcfg, storage_path=ray_dir,
                 name=f"fold{fold}-{fhash[:8]}", score=(SELECTION_KEY, "max"), report_to_tune=report_to_tune)
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][SELECTION_KEY])
    history = _run_history(result.checkpoint)  # every epoch run (the selected checkpoint's stops at its epoch)
    val_rows = split["train"] if inner else split["val"]  # under inner_cv every training row validated once
    selection = {"fold": fold, "test_session": fold, "split_digest": plan.digest,
                 "n_train": int(len(split["train"])), "n_val": int(len(val_rows)),
                 "best_epoch": int(best_metrics["epoch"]), "epoch_selection": epoch_selection(cfg),
                 **({"inner_cv": {k: v for k, v in inner.items() if k != "epoch"}} if inner else {}),
                 **{k: float(best_metrics[k]) for k in ("val_ua", "val_wa", "val_macro_f1", "val_loss", "val_bal_loss",
                                                        "val_smoothed") if k in best_metrics},
                 **task.selection_record(best_metrics, plan.dropped),
                 "epochs_run": len(history), "config_hash": fhash, "seed": cfg.seed,
                 "pretrain_sessions": audit["pretrain_sessions"], "stats_sessions": audit["stats_sessions"],
                 "val_speakers": sorted(set(val_rows["speaker"])),
                 "val_sessions": sorted(int(g) for g in set(val_rows["session"])), "protocol": audit["protocol"],
                 "val_split": tcfg.val_split, "label_fraction": float(tcfg.label_fraction),
                 "lr": float(loop_config["lr"]),  # the rate the model trained at (inner_cv_lrs: the inner folds' choice)
                 "code": provenance.code_record(),  # the code that trained it (fold_result.json keeps it)
                 "history": history}
    with storage.staged(fold_dir) as local:  # a URI: written locally, uploaded when the fold is complete
        model_dir = local / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        best_ckpt.to_directory(str(model_dir))
        _slim_checkpoint(model_dir)
        storage.write_text(local / FOLD_SELECTION, json.dumps(selection, indent=2))
        storage.write_text(local / SPLIT_FILE, json.dumps({k: sorted(v["utt_id"]) for k, v in split.items()}))
        if not score_test:
            return selection
        res = _test_fold(cfg, fold, local, model_dir, split, selection, task)
    if loop_config["tracking"]:
        tracker = Tracker.from_target(tracking)
        run_id = tracker.find_run(loop_config["tracking"]["key"])
        tracker.log_metrics(run_id, test_scores(res) | {"best_epoch": selection["best_epoch"]})
    return res


def epoch_selection(cfg) -> str:
    """``finetune.epoch_selection``: ``val`` (the epoch with the best smoothed score on held-out training
    speakers) or ``inner_cv`` (the epoch count from a cross-validation over the training groups, then a
    model trained on all of them)."""
    return str(cfg.finetune.get("epoch_selection", "val") or "val")


#: the validation metrics averaged over the inner folds into the final fit's per-epoch estimate
CV_KEYS = ("val_ua", "val_wa", "val_macro_f1", "val_loss", "val_bal_loss")


def _inner_cv(cfg, fold: int, split: Dict[str, pd.DataFrame], loop_config: Dict[str, Any], task_cls, ray_dir: str,
              name: str) -> Dict[str, Any]:
    """The epoch count (and, with ``finetune.inner_cv_lrs``, the learning rate) of a fold chosen by
    cross-validation over its training groups: one fit per training group held out (trained on the
    others, validated on it, with the fold's recipe, adapter and statistics) and per candidate rate,
    their per-epoch validation metrics averaged over the groups, the best (rate, epoch) of the mean
    curves taken (ties: the later epoch, then the lower rate). Every rate sees the same inner splits
    and seeds. Nothing of the fold's test group takes part (asserted)."""
    train = split["train"]
    groups = sorted(int(g) for g in set(train["session"]))
    if fold in groups or set(train["speaker"]) & set(split["test"]["speaker"]):
        raise AssertionError(f"leakage: fold {fold}'s inner cross-validation holds its test group")
    tcfg = cfg.finetune
    lrs = [float(v) for v in (tcfg.get("inner_cv_lrs") or [])] or [float(loop_config["lr"])]
    metric = loop_config["select_metric"]
    per_lr = {}
    for i, lr in enumerate(lrs):
        histories = {}
        for g in groups:
            inner = {"train": train[train["session"] != g], "val": train[train["session"] == g], "test": split["test"]}
            config = {**loop_config, "lr": lr, "run_seed": run_seed(cfg.seed, fold, "finetune", "inner", g), "tracking": None,
                      "class_weights": _class_weights(inner["train"]["label"], tcfg.class_weighting, loop_config["labels"]),
                      "steps_per_epoch": steps_per_epoch(len(inner["train"]), tcfg.batch_size, tcfg.num_workers)}
            run_name = f"{name}-inner{g}" if len(lrs) == 1 else f"{name}-lr{i}-inner{g}"
            result = fit(task_cls, config, fold_datasets(cfg, fold, inner), tcfg, storage_path=ray_dir,
                         name=run_name, score=(SELECTION_KEY, "max"))
            histories[g] = _run_history(result.checkpoint)
        keys = [k for k in (*CV_KEYS, metric) if all(k in h[0] for h in histories.values())]
        epochs = min(len(h) for h in histories.values())
        curve = {k: [float(np.nanmean([h[e][k] for h in histories.values()])) for e in range(epochs)]
                 for k in dict.fromkeys(keys)}
        per_group = {str(g): [float(h[e][metric]) for e in range(epochs)] for g, h in histories.items()}
        per_lr[lr] = (curve, per_group)
    # the best mean score; ties: the later epoch, then the lower learning rate
    lr, best = max(((lr, e) for lr, (curve, _) in per_lr.items() for e in range(len(curve[metric]))),
                   key=lambda p: (per_lr[p[0]][0][metric][p[1]], p[1], -p[0]))
    curve, per_group = per_lr[lr]
    out = {"epoch": best, "groups": groups, "curve": curve, "per_group": per_group}
    if len(lrs) > 1:
        out.update(lr=lr, lr_curves={repr(v): c[metric] for v, (c, _) in per_lr.items()})
    return out


def test_fold(cfg, fold: int) -> Dict[str, Any]:
    """Score the test split of a fold that :func:`run_fold` trained and selected with
    ``score_test=False`` (its ``selection.json`` and ``model/``), once; write ``fold_result.json``."""
    fold_dir = _fold_path(cfg, fold)
    selection = fold_record(cfg, fold, FOLD_SELECTION)
    if selection is None:
        raise DataError(f"fold {fold} has no readable selected model of this config in {storage.describe(fold_dir)} "
                        f"({FOLD_SELECTION}); run the fold again")
    with storage.staged(fold_dir) as local:
        model_dir = storage.local_copy(storage.join(fold_dir, "model")) if storage.is_uri(fold_dir) else local / "model"
        return _test_fold(cfg, fold, local, Path(model_dir), task_split(cfg, fold)[0], selection, task_of(cfg))


def _run_history(checkpoint) -> List[Dict[str, Any]]:
    """The per-epoch history stored in a run's latest checkpoint."""
    import io

    from serray.train.checkpoint import STATE_FILE

    with checkpoint.as_directory() as d:
        state = torch.load(io.BytesIO((Path(d) / STATE_FILE).read_bytes()), map_location="cpu", weights_only=True)
    return list(state.get("history", []))


TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_end", "weight_decay", "warmup_frac", "grad_clip", "max_frames", "select_smooth",
              "bf16", "fail_at_step", "body_lr_scale", "freeze_epochs", "patience")


def _slim_checkpoint(model_dir: Path) -> None:
    """Drop the optimiser from a selected checkpoint (the registry and serving need the weights only)."""
    import io

    state = torch.load(model_dir / "state.pt", map_location="cpu", weights_only=True)
    if state.pop("optimizer", None) is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(model_dir / "state.pt", buf.getvalue())


FOLD_SELECTION = "selection.json"  # what a fold's training chose (epoch, validation metrics, audit), before any test
SPLIT_FILE = "split.json"  # the fold's utterance ids: train / val / test (cross-corpus evaluation's reference trains on them)
TEST_LEDGER = "test_scorings.jsonl"  # one line per scoring of the fold's test split


def _count_test_scoring(cfg, fold: int, local: Path, fhash: str, n_test: int) -> int:
    """Record one scoring of fold ``fold``'s test split in the fold's ledger; return how many times a
    model of this config has now been scored on it (1 unless something scored the test split again)."""
    import time

    ledger = storage.join(_fold_path(cfg, fold), TEST_LEDGER)
    before = storage.read_text(ledger) if storage.is_file(ledger) else ""
    text = before + json.dumps({"config_hash": fhash, "n_test": n_test, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    storage.write_text(local / TEST_LEDGER, text)
    return sum(1 for line in text.splitlines() if line.strip() and json.loads(line).get("config_hash") == fhash)


def _test_fold(cfg, fold: int, fold_dir: Path, model_dir: Path, split, selection: Dict[str, Any], task) -> Dict[str, Any]:
    """Score the fold's test split with the selected checkpoint, count the scoring, write the result."""
    from serray.train.scoring import Scorer

    test_ids = list(split["test"]["utt_id"])
    preds = Scorer.from_checkpoint(model_dir).predict_stored(cfg.features.dir, [fold], test_ids)
    preds = preds.sort_values("utt_id", kind="stable").reset_index(drop=True)  # not the feature files' order
    assert len(preds) == len(test_ids) and set(preds["utt_id"]) == set(test_ids), "the test split was not scored whole"
    if "label" in preds.columns:  # the class the manifest gives now, not the one stored with the features
        preds["label"] = preds["utt_id"].map(dict(zip(split["test"]["utt_id"], split["test"]["label"])))
    test_evaluations = _count_test_scoring(cfg, fold, fold_dir, selection["config_hash"], len(preds))
    preds.insert(0, "fold", fold)
    preds.insert(1, "seed", cfg.seed)
    preds, m = task.test_metrics(cfg, preds, split["test"])  # (dimensional: the true ratings beside the predicted)
    preds.to_csv(fold_dir / "predictions.csv", index=False)
    result = {**{k: v for k, v in selection.items() if k != "history"}, **m, "n_test": int(len(preds)),
              "classes_in_test": sorted(set(preds["label"])), "test_evaluations": test_evaluations,
              # the code that trained the fold (a later run reusing it, or scoring it apart, still names it)
              "code": selection.get("code") or provenance.code_record(),
              "history": selection.get("history", [])}
    storage.write_text(fold_dir / FOLD_RESULT, json.dumps(result, indent=2))
    return result


def _fold_path(cfg, fold: int) -> str:
    return storage.join(storage.absolute(cfg.finetune.dir), f"fold{fold}")


def fold_done(cfg, fold: int) -> Optional[Dict[str, Any]]:
    """The stored result of a finished fold with this config and these rows, or None."""
    return fold_record(cfg, fold, FOLD_RESULT)


def fold_record(cfg, fold: int, name: str) -> Optional[Dict[str, Any]]:
    """A fold's stored record (``fold_result.json`` / ``selection.json``) when it was made with this config
    **and** the rows the fold has now (:func:`serray.train.folds.split_digest`: an edited CSV or label map,
    another ``data.num_folds`` or ``data.sessions`` change the rows while the config hash stays), else None."""
    from serray.train.folds import split_digest

    record = _read_record(storage.join(_fold_path(cfg, fold), name), finetune_hash(cfg))
    if record is None or "split_digest" not in record:  # (records written before the digest: reused as before)
        return record
    now = split_digest(task_split(cfg, fold)[0])
    if record.get("split_digest") != now:
        log.info("fold %d's rows changed since %s was written; it is trained again", fold, name)
        return None
    return record


def _read_record(path: str, config_hash: str) -> Optional[Dict[str, Any]]:
    """A fold's JSON record (result or selection) when it is readable and of this config, else None
    (a torn record is reported, and the fold is redone rather than blocking every rerun)."""
    if not storage.is_file(path):
        return None
    try:
        res = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: not valid JSON (%s); the fold is redone", storage.describe(path), e)
        return None
    return res if isinstance(res, dict) and res.get("config_hash") == config_hash else None


def _tune_storage(path: str) -> Dict[str, Any]:
    """``storage_path`` (+ ``storage_filesystem`` for a URI) of a Tune ``RunConfig``."""
    p, fs = storage.train_storage(path)
    return {"storage_path": p, "storage_filesystem": fs}


def run_folds(cfg, tracking: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Run every pending fold as a parallel Ray Tune trial (pre-training included); finished folds are
    reused. ``tracking``: the MLflow run the folds' runs nest under."""
    import ray.tune as tune

    from serray.ray_utils import init_ray

    feat_meta = check_features(cfg)  # fail fast, before any trial starts
    if uses_pretraining(cfg) and (cfg.finetune.init_from or not cfg.pretrain.per_fold):
        if not cfg.pretrain.per_fold and not cfg.finetune.init_from:
            run_pretrain(cfg, tracking=tracking)  # the one shared (transductive) adapter
        for f in cfg.finetune.folds:
            check_adapter(cfg, feat_meta, adapter_path(cfg, f))
    done = {f: r for f in cfg.finetune.folds if (r := fold_done(cfg, f)) is not None}
    pending = [f for f in cfg.finetune.folds if f not in done]
    if done:
        log.info("folds %s already finished with this config; reusing them", sorted(done))
    if pending:
        init_ray(cfg)
        from serray.progress import EpochProgress

        trainable = tune.with_resources(tune.with_parameters(_fold_trial, cfg_dict=as_dict(cfg), tracking=tracking),
                                        trial_resources(cfg))
        epochs = cfg.finetune.epochs + (cfg.pretrain.epochs if uses_pretraining(cfg) and cfg.pretrain.per_fold
                                        and not cfg.finetune.init_from else 0)
        tuner = tune.Tuner(
            trainable,
            param_space={"fold": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.finetune.max_concurrent_folds),
            run_config=tune.RunConfig(**_tune_storage(storage.join(storage.absolute(cfg.finetune.dir), "tune")),
                                      name=f"folds-{finetune_hash(cfg)[:8]}", verbose=0,
                                      callbacks=[EpochProgress(len(pending) * epochs, lambda c: f"fold {c['fold']}")]),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise errors[0]
    results = [done.get(f) or fold_done(cfg, f) for f in cfg.finetune.folds]
    missing = [f for f, r in zip(cfg.finetune.folds, results) if r is None]
    if missing:
        raise DataError(f"folds {missing} produced no result (see the Ray logs above)")
    return results


def require_training_resources(cfg, stages=("finetune", "pretrain")) -> None:
    """A clear error (after ``ray.resource_timeout_s``) when no node can hold a training worker of the
    stages that run, instead of trials that wait forever."""
    import ray

    from serray.train.loop import wait_for_workers

    if not ray.is_initialized():
        return
    for stage in stages:
        if stage != "pretrain" or uses_pretraining(cfg):
            wait_for_workers(cfg, stage)


def trial_resources(cfg, extra_cpu: float = 0.0) -> Dict[str, float]:
    """What a Tune trial that runs folds reserves: the worker's CPU/GPU when its loops run in the
    trial itself (``backend=local``), nothing but a little memory when Ray Train workers do."""
    from serray.train.loop import backend

    require_training_resources(cfg)
    if backend(cfg.finetune) == "local" or (uses_pretraining(cfg) and backend(cfg.pretrain) == "local"):
        res = {"cpu": max(cfg.finetune.cpus_per_worker, cfg.pretrain.cpus_per_worker) + extra_cpu}
        if cfg.finetune.use_gpu or cfg.pretrain.use_gpu:
            res["gpu"] = max(cfg.finetune.gpus_per_worker if cfg.finetune.use_gpu else 0,
                             cfg.pretrain.gpus_per_worker if cfg.pretrain.use_gpu else 0)
        return res
    return {"cpu": extra_cpu, "memory": 64 * 1024**2} if extra_cpu else {"cpu": 0, "memory": 64 * 1024**2}


def _fold_trial(config: Dict[str, Any], cfg_dict: Dict[str, Any], tracking: Optional[Dict[str, Any]] = None) -> None:
    """One Tune trial = one fold (pre-training if needed, a Ray Train run, the test)."""
    import ray.tune
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_dict)
    res = run_fold(cfg, int(config["fold"]), report_to_tune=True, report_pretrain=True, tracking=tracking)
    ray.tune.report({k: v for k, v in res.items() if isinstance(v, (int, float))})


def run_finetune(cfg, extra: Optional[Dict[str, Any]] = None, selection: str = "fixed",
                 hyperparameters: Optional[Dict[str, Any]] = None, selected_on: Optional[str] = None) -> Dict[str, Any]:
    """All folds, then metrics.json / results.md / predictions.csv / plots under ``finetune.dir``
    (``extra`` is added to metrics.json); registered when ``finetune.register`` (``selection`` says how
    the configuration was chosen: ``fixed`` for a config as given). Tracked as one MLflow run with a
    child run per fold and per pre-training (:mod:`serray.tracking`)."""
    from serray.tracking import Tracker, config_params, log_loso, stage_key

    tracker, fhash = Tracker.of(cfg), finetune_hash(cfg)
    with tracker.run(stage_key("loso", fhash, storage.absolute(cfg.finetune.dir)), f"loso {cfg.finetune.mode} {fhash[:8]}",
                     tags={"stage": "loso", "mode": cfg.finetune.mode, "selection": selection,
                           "encoder": storage.public_name(cfg.encoder.name)},
                     params=config_params(cfg)) as run_id:
        folds = run_folds(cfg, tracking=tracker.target(run_id))
        summary = write_loso(cfg, folds, cfg.finetune.dir, extra)
        log_loso(tracker, run_id, summary, cfg.finetune.dir)
        if run_id:
            summary["mlflow_run_id"] = run_id
        if cfg.finetune.register:
            summary["registered"] = register_result(cfg, summary, source="tune" if selection != "fixed" else "finetune",
                                                    selection=selection, hyperparameters=hyperparameters,
                                                    selected_on=selected_on,
                                                    extra={"mlflow_run_id": run_id} if run_id else None)["id"]
            tracker.set_tags(run_id, {"registry_entry": summary["registered"]})
    return summary


def write_loso(cfg, folds: List[Dict[str, Any]], out_dir: str, extra: Optional[Dict[str, Any]] = None,
               config_hash: Optional[str] = None) -> Dict[str, Any]:
    """The LOSO outputs of finished folds (their ``fold<k>/`` under ``out_dir``) and the config."""
    from serray.config import save_config
    from serray.train.protocol import corpus_protocol

    where = corpus_protocol(cfg)
    title = (f"{where['evaluation']}, corpus={where['corpus']}, mode={cfg.finetune.mode}, encoder={cfg.encoder.name}, "
             f"protocol={protocol(cfg)}") if where["corpus"] != "iemocap" else \
        f"leave-one-session-out, mode={cfg.finetune.mode}, encoder={cfg.encoder.name}, protocol={protocol(cfg)}"
    task = task_of(cfg)
    title += task.title_suffix(cfg)
    tested = [int(f) for f in cfg.finetune.folds]
    seeds = {f: {"pretrain": run_seed(cfg.seed, f, "pretrain"), "finetune": run_seed(cfg.seed, f, "finetune")}
             for f in tested}
    with storage.staged(out_dir) as out:
        save_config(cfg, out)
        return task.write_results(cfg, folds, out, {"mode": cfg.finetune.mode, **task.run_record(cfg),
                                                    "encoder": cfg.encoder.name, "protocol": protocol(cfg),
                                                    "config_hash": config_hash or finetune_hash(cfg),
                                                    "title": title, **where, "folds_tested": tested,
                                                    **(extra or {}),
                                                    "provenance": provenance.collect(cfg, tested, seeds, folds)},
                                  folds_dir=storage.absolute(out_dir))


def register_result(cfg, summary: Dict[str, Any], source: str, hyperparameters: Optional[Dict[str, Any]] = None,
                    selected_on: Optional[str] = None, selection: str = "fixed",
                    model_cfg=None, finetune_dir: Optional[str] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Register a finished LOSO run: the fold model with the best validation UA, with the run's LOSO
    test metrics and mean validation UA (an entry with the same config hash and folds is reused).

    ``cfg`` says how the run was evaluated (:func:`serray.train.protocol.evaluation` with ``selection``);
    ``model_cfg`` is the config the fold models were trained with when it differs (a nested sweep:
    every fold has its own), ``finetune_dir`` where their ``fold<k>/model`` are (default
    ``finetune.dir``); ``extra`` goes into the entry record (it may override ``config_hash``)."""
    from serray.train.registry import list_entries, register

    model_cfg = model_cfg or cfg
    fhash = (extra or {}).get("config_hash") or finetune_hash(cfg)
    ev = evaluation(cfg, selection)
    for entry in list_entries(cfg.registry.dir):
        if entry.get("config_hash") == fhash and entry.get("folds") == ev["folds"]:
            return entry
    sel = task_of(model_cfg).select_metric(model_cfg)  # the fold model with the best validation score of it
    best = max(summary["folds"], key=lambda f: (f.get(sel, 0.0), -f["fold"]))
    base = finetune_dir or storage.absolute(cfg.finetune.dir)
    model = storage.join(base, f"fold{best['fold']}", "model")
    metrics = {**summary["mean"], sel: float(np.mean([f.get(sel, float("nan")) for f in summary["folds"]]))}
    enc_files = None
    from serray.data.features.encoders import BUILTIN_ENCODERS

    if model_cfg.registry.include_encoder and model_cfg.encoder.name not in BUILTIN_ENCODERS:
        from serray.train.registry import encoder_files

        enc_files = encoder_files(model_cfg.encoder.name)
        if enc_files is None:
            log.warning("registry: the files of encoder %s are not on this machine, so the entry does not carry "
                        "them; Serve replicas will load it from the hub or their cache", model_cfg.encoder.name)
    record = {"config_hash": fhash, **ev, "model_fold": best["fold"],
              "provenance": summary.get("provenance") or provenance.collect(cfg, [int(f["fold"]) for f in summary["folds"]]),
              "selected_on": selected_on or (f"{sel} (epoch counts by inner cross-validation)" if epoch_selection(model_cfg) == "inner_cv"
                                             else f"{sel} (epochs)"), "std": dict(summary["std"]), "task": task_name(model_cfg),
              "finetune_dir": storage.without_credentials(base), **{k: v for k, v in (extra or {}).items() if k != "config_hash"}}
    return register(cfg.registry.dir, model, metrics=metrics, config_yaml=to_yaml(model_cfg), source=source,
                    hyperparameters=hyperparameters, encoder_files=enc_files, extra=record)
