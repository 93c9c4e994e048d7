"""SER fine-tuning and the paper's evaluation: SAP + classifier, 5-fold leave-one-session-out.

Each fold trains on four sessions, selects the epoch by UA on a validation part drawn only from
those sessions, and tests once, with the selected checkpoint, on the held-out session (whose
speakers are asserted absent from training and validation). Folds run as parallel Ray Tune trials;
each trial is one Ray Train run of the shared loop (:mod:`serray.train.loop`) with
:class:`FinetuneTask`. A finished fold is kept (``fold_result.json``) and an interrupted one resumes
from its latest Ray Train checkpoint, so rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from serray.config import OPERATIONAL_KEYS, as_dict, section_hash, to_yaml
from serray.data.features import LABEL_INDEX, PadCollate, feature_dataset, read_rows, session_paths
from serray.data.iemocap import LABELS
from serray.errors import DataError
from serray.models.classifier import EmotionClassifier, body_state_from_adapter
from serray import storage
from serray.train.checkpoint import META_FILE, MODEL_KEY, load_checkpoint
from serray.train.loop import fit, steps_per_epoch
from serray.train.metrics import classification_metrics
from serray.data.featurize import feature_identity, feature_stats
from serray.train.pretrain import check_features

log = logging.getLogger(__name__)

FOLD_RESULT = "fold_result.json"
BODY_KEYS = ("input_dim", "d_model", "num_layers", "num_heads", "ff_dim", "dropout", "num_input_layers")


class FinetuneTask:
    """The fine-tuning task plugged into the shared loop."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config
        self.weight = torch.tensor(config["class_weights"], dtype=torch.float32) if config["class_weights"] else None
        self._val_batches: Optional[list] = None  # the validation part is small: decoded once, kept in memory

    def build_model(self) -> EmotionClassifier:
        model = EmotionClassifier(**self.config["model"])
        model.set_feature_stats(*self.config["feature_stats"])  # baseline; an adapter body brings its own
        if self.config["init_from"]:
            state, _ = load_checkpoint(self.config["init_from"])
            model.body.load_state_dict(body_state_from_adapter(state[MODEL_KEY], self.config["branch"]))
        return model

    def trainable_parameters(self, model: EmotionClassifier) -> list:
        return model.trainable_parameters()

    def collate(self, train: bool, epoch: int = 0) -> PadCollate:
        return PadCollate(self.config["max_frames"] if train else None, random_crop=train,
                          seed=self.config["seed"] * 1000 + epoch)

    def step(self, model, batch, step: int):
        logits = model(batch["x"], batch["padding_mask"])
        weight = None if self.weight is None else self.weight.to(logits.device)
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight)
        return loss, {"loss": float(loss.detach())}

    def after_step(self, core, step: int, total_steps: int) -> Dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model, core, device, epoch: int) -> Dict[str, float]:
        """UA / WA / macro-F1 and loss on the validation part (every worker sees all of it)."""
        import ray.train

        core.eval()
        if self._val_batches is None:
            self._val_batches = list(ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=self.config["batch_size"], collate_fn=self.collate(train=False)))
        ys, preds, losses = [], [], []
        for batch in self._val_batches:
            logits = core(batch["x"].to(device), batch["padding_mask"].to(device)).float()
            losses.append(float(F.cross_entropy(logits, batch["labels"].to(device), reduction="sum")))
            ys.append(batch["labels"].numpy())
            preds.append(logits.argmax(-1).cpu().numpy())
        y, p = np.concatenate(ys), np.concatenate(preds)
        m = classification_metrics(y, p)
        return {"val_loss": sum(losses) / len(y), "val_ua": m["ua"], "val_wa": m["wa"], "val_macro_f1": m["macro_f1"]}

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def checkpoint_meta(self, core: EmotionClassifier, step: int, epoch: int) -> Dict[str, Any]:
        return {"kind": "classifier", "model": core.config, "features": self.config["features"],
                "labels": list(LABELS), "fold": self.config["fold"], "test_session": self.config["fold"],
                "mode": self.config["mode"], "config_hash": self.config["config_hash"], "step": step, "epoch": epoch}


def finetune_hash(cfg) -> str:
    """What makes two fine-tuning runs the same (the adapter and pre-training count unless mode=none)."""
    keys = ["encoder", "finetune", "seed", "data.merge_excited"]
    if cfg.finetune.mode != "none":
        keys += ["adapter", "pretrain"]
    return section_hash(cfg, *keys, exclude=OPERATIONAL_KEYS + ("folds", "max_concurrent_folds", "init_from"))


def split_fold(rows: pd.DataFrame, test_session: int, val_fraction: float, seed: int) -> Dict[str, pd.DataFrame]:
    """Leave-one-session-out split: train/val from the other sessions (stratified), test = that session.

    Raises:
        AssertionError: a speaker of the test session appears in training or validation.
    """
    from sklearn.model_selection import train_test_split

    test = rows[rows["session"] == test_session]
    rest = rows[rows["session"] != test_session]
    n_val = math.ceil(val_fraction * len(rest))  # sklearn's rounding of a float test_size
    counts = rest["label"].value_counts()
    # stratify when sklearn can: >= 2 rows per class, and room for every class in both parts
    stratified = counts.min() >= 2 and n_val >= len(counts) and len(rest) - n_val >= len(counts)
    strat = rest["label"] if stratified else None
    train, val = train_test_split(rest, test_size=val_fraction, random_state=seed + test_session, stratify=strat)
    leak = set(test["speaker"]) & (set(train["speaker"]) | set(val["speaker"]))
    assert not leak, f"speaker leakage into fold {test_session}: {sorted(leak)}"
    return {"train": train.sort_values("utt_id"), "val": val.sort_values("utt_id"), "test": test.sort_values("utt_id")}


def _class_weights(labels: pd.Series, how: str) -> Optional[List[float]]:
    if how == "none":
        return None
    counts = Counter(labels)
    n, k = len(labels), len(LABELS)
    return [n / (k * counts[l]) if counts.get(l) else 0.0 for l in LABELS]


def _model_kwargs(cfg, feat_meta: dict) -> Dict[str, Any]:
    body = None
    if cfg.finetune.mode != "none":
        _, ameta = load_checkpoint(cfg.finetune.init_from)
        body = {k: ameta["model"][k] for k in BODY_KEYS}
    return {"input_dim": feat_meta["dim"], "num_classes": len(LABELS), "num_input_layers": feat_meta["num_layers"],
            "body": body, "freeze_body": cfg.finetune.mode == "frozen", "attention_dim": cfg.finetune.attention_dim,
            "hidden_dim": cfg.finetune.hidden_dim, "dropout": cfg.finetune.head_dropout}


def check_adapter(cfg, feat_meta: dict) -> None:
    """The pre-trained adapter must exist and match the features (a clear error naming both)."""
    if cfg.finetune.mode == "none":
        return
    path = str(cfg.finetune.init_from)
    if not storage.is_file(storage.join(path, META_FILE)):
        raise DataError(f"no pre-trained adapter at finetune.init_from={storage.describe(path)} (run `serray pretrain` first, "
                        "or use finetune.mode=none for the no-adapter baseline)")
    _, ameta = load_checkpoint(path)
    if ameta.get("kind") != "adapter":
        raise DataError(f"finetune.init_from={storage.describe(path)} holds a '{ameta.get('kind')}' checkpoint, not a pre-trained adapter")
    from serray.data.encoders import check_identity

    check_identity(feat_meta, ameta["features"], f"features in {storage.describe(cfg.features.dir)}",
                   f"adapter checkpoint {storage.describe(path)}")


def fold_split(cfg, fold: int) -> Dict[str, pd.DataFrame]:
    """The train / val / test rows of one fold (metadata only)."""
    rows = read_rows(cfg.features.dir, cfg.data.sessions, columns=("utt_id", "label", "speaker"))
    rows["session"] = rows["speaker"].str.slice(3, 5).astype(int)
    return split_fold(rows, fold, cfg.finetune.val_fraction, cfg.seed)


def fold_datasets(cfg, fold: int, split: Optional[Dict[str, pd.DataFrame]] = None) -> Dict[str, Any]:
    """Ray Datasets of a fold's training and validation parts (materialized when small, see
    :func:`serray.data.features.feature_dataset`)."""
    split = split if split is not None else fold_split(cfg, fold)
    train_sessions = [s for s in cfg.data.sessions if s != fold]
    cache = cfg.features.cache_max_mb
    return {"train": feature_dataset(cfg.features.dir, train_sessions, split["train"]["utt_id"], cache),
            "val": feature_dataset(cfg.features.dir, train_sessions, split["val"]["utt_id"], cache)}


def run_fold(cfg, fold: int, callbacks: Optional[list] = None, datasets: Optional[Dict[str, Any]] = None
             ) -> Dict[str, Any]:
    """Train, select and test one leave-one-session-out fold; write its directory; return its result.

    ``datasets`` (train/val) may be prepared by the caller, e.g. materialized by the driver before
    the fold runs as a Tune trial (inside a trial, Ray Data cannot execute in the driver).
    """
    feat_meta = check_features(cfg)
    check_adapter(cfg, feat_meta)
    tcfg, fhash = cfg.finetune, finetune_hash(cfg)
    fold_dir = _fold_path(cfg, fold)
    split = fold_split(cfg, fold)
    train_sessions = [s for s in cfg.data.sessions if s != fold]
    datasets = datasets or fold_datasets(cfg, fold, split)
    loop_config = {
        "task": "finetune", "seed": cfg.seed, "fold": fold, "mode": tcfg.mode, "branch": tcfg.branch,
        "config_yaml": to_yaml(cfg), "config_hash": fhash, "features": feature_identity(feat_meta),
        "feature_stats": [a.tolist() for a in feature_stats(feat_meta, train_sessions)],
        "model": _model_kwargs(cfg, feat_meta),
        "init_from": storage.absolute(tcfg.init_from) if tcfg.mode != "none" else "",
        "class_weights": _class_weights(split["train"]["label"], tcfg.class_weighting),
        **{k: v for k, v in as_dict(tcfg).items() if k in TRAIN_KEYS},
        "steps_per_epoch": steps_per_epoch(len(split["train"]), tcfg.batch_size, tcfg.num_workers),
        "fault_marker": storage.join(fold_dir, "fault_injected.marker"),
    }
    result = fit(loop_config, datasets, tcfg, storage_path=storage.join(storage.absolute(tcfg.dir), "ray"),
                 name=f"fold{fold}-{fhash[:8]}", score=("val_ua", "max"), callbacks=callbacks)
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_ua"])
    with storage.staged(fold_dir) as local:  # a URI: written locally, uploaded when the fold is complete
        model_dir = local / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        best_ckpt.to_directory(str(model_dir))
        return _test_fold(cfg, fold, local, model_dir, split, best_metrics, fhash)


TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_end", "weight_decay", "warmup_frac", "grad_clip", "max_frames",
              "shuffle_buffer", "bf16", "fail_at_step")


def _test_fold(cfg, fold: int, fold_dir: Path, model_dir: Path, split, best_metrics, fhash: str) -> Dict[str, Any]:
    from serray.predict import Predictor

    state = torch.load(model_dir / "state.pt", map_location="cpu", weights_only=True)
    history = list(state.get("history", []))
    for key in ("optimizer",):  # the selected model is all the registry / serving needs
        state.pop(key, None)
    torch.save(state, model_dir / "state.pt")
    predictor = Predictor.from_checkpoint(model_dir)
    preds = predictor.predict_parquet(session_paths(cfg.features.dir, [fold]))
    assert len(preds) == len(split["test"]) and set(preds["utt_id"]) == set(split["test"]["utt_id"])
    preds.insert(0, "fold", fold)
    preds.to_csv(fold_dir / "predictions.csv", index=False)
    m = classification_metrics([LABEL_INDEX[l] for l in preds["label"]], [LABEL_INDEX[l] for l in preds["pred"]])
    result = {"fold": fold, "test_session": fold, **m, "n_test": int(len(preds)),
              "n_train": int(len(split["train"])), "n_val": int(len(split["val"])),
              "best_epoch": int(best_metrics["epoch"]), "val_ua": float(best_metrics["val_ua"]),
              "classes_in_test": sorted(set(preds["label"])), "config_hash": fhash, "history": history}
    (fold_dir / FOLD_RESULT).write_text(json.dumps(result, indent=2))
    return result


def _fold_path(cfg, fold: int) -> str:
    return storage.join(storage.absolute(cfg.finetune.dir), f"fold{fold}")


def _fold_done(cfg, fold: int) -> Optional[Dict[str, Any]]:
    path = storage.join(_fold_path(cfg, fold), FOLD_RESULT)
    if storage.is_file(path):
        res = json.loads(storage.read_text(path))
        if res.get("config_hash") == finetune_hash(cfg):
            return res
    return None


def _tune_storage(path: str) -> Dict[str, Any]:
    """``storage_path`` (+ ``storage_filesystem`` for a URI) of a Tune ``RunConfig``."""
    p, fs = storage.train_storage(path)
    return {"storage_path": p, "storage_filesystem": fs}


def run_folds(cfg) -> List[Dict[str, Any]]:
    """Run every pending fold as a parallel Ray Tune trial; finished folds are reused."""
    import ray.tune as tune

    from serray.ray_utils import init_ray

    feat_meta = check_features(cfg)  # fail fast, before any trial starts
    check_adapter(cfg, feat_meta)
    done = {f: r for f in cfg.finetune.folds if (r := _fold_done(cfg, f)) is not None}
    pending = [f for f in cfg.finetune.folds if f not in done]
    if done:
        log.info("folds %s already finished with this config; reusing them", sorted(done))
    if pending:
        init_ray(cfg)
        cfg_dict = as_dict(cfg)
        # read once here, outside any placement group; small sets are materialized in the object
        # store so no fold re-reads Parquet (and starts read tasks) every epoch
        datasets = {f: fold_datasets(cfg, f) for f in pending}
        trainable = tune.with_resources(tune.with_parameters(_fold_trial, cfg_dict=cfg_dict, datasets=datasets),
                                        {"cpu": 0, "memory": 64 * 1024**2})
        tuner = tune.Tuner(
            trainable,
            param_space={"fold": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.finetune.max_concurrent_folds),
            run_config=tune.RunConfig(**_tune_storage(storage.join(storage.absolute(cfg.finetune.dir), "tune")),
                                      name=f"folds-{finetune_hash(cfg)[:8]}", verbose=0),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise errors[0]
    results = [done.get(f) or _fold_done(cfg, f) for f in cfg.finetune.folds]
    missing = [f for f, r in zip(cfg.finetune.folds, results) if r is None]
    if missing:
        raise DataError(f"folds {missing} produced no result (see the Ray logs above)")
    return results


def _fold_trial(config: Dict[str, Any], cfg_dict: Dict[str, Any], datasets: Dict[int, Dict[str, Any]]) -> None:
    """One Tune trial = one fold (a Ray Train run, then the test on the held-out session)."""
    import ray.tune
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_dict)
    fold = int(config["fold"])
    res = run_fold(cfg, fold, datasets=datasets.get(fold))
    ray.tune.report({k: v for k, v in res.items() if isinstance(v, (int, float))})


def run_finetune(cfg) -> Dict[str, Any]:
    """All folds, then metrics.json / results.md / predictions.csv / plots under ``finetune.dir``."""
    from serray.config import save_config
    from serray.train.results import write_results

    folds = run_folds(cfg)
    title = f"leave-one-session-out, mode={cfg.finetune.mode}, encoder={cfg.encoder.name}"
    with storage.staged(cfg.finetune.dir) as out:
        save_config(cfg, out)
        summary = write_results(folds, out, {"mode": cfg.finetune.mode, "encoder": cfg.encoder.name,
                                             "config_hash": finetune_hash(cfg), "title": title},
                                folds_dir=storage.absolute(cfg.finetune.dir))
    if cfg.finetune.register:
        summary["registered"] = register_result(cfg, summary, source="finetune")["id"]
    return summary


def register_result(cfg, summary: Dict[str, Any], source: str, hyperparameters: Optional[Dict[str, Any]] = None
                    ) -> Dict[str, Any]:
    """Register a finished LOSO run: the fold model with the best validation UA, with the run's LOSO
    test metrics (an entry with the same config hash is reused, not duplicated)."""
    from serray.registry import list_entries, register

    fhash = finetune_hash(cfg)
    for entry in list_entries(cfg.registry.dir):
        if entry.get("config_hash") == fhash and entry.get("folds") == list(cfg.finetune.folds):
            return entry
    best = max(summary["folds"], key=lambda f: (f.get("val_ua", 0.0), -f["fold"]))
    model = storage.join(_fold_path(cfg, best["fold"]), "model")
    return register(cfg.registry.dir, model, metrics=dict(summary["mean"]), config_yaml=to_yaml(cfg), source=source,
                    hyperparameters=hyperparameters,
                    extra={"config_hash": fhash, "folds": list(cfg.finetune.folds), "model_fold": best["fold"],
                           "std": dict(summary["std"]), "finetune_dir": storage.absolute(cfg.finetune.dir)})
