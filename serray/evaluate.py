"""Cross-corpus evaluation: a registered model scored on another corpus's test split.

``serray evaluate registry.dir=runs/iemocap/registry data.corpus=crema-d data.root=/data/CREMA-D
output_dir=runs/on-cremad`` builds the target's manifest, featurizes it with the model's own frozen
encoder (its identity comes from the model, so features cannot be mixed), and predicts the
four-class utterances of the target's test groups (``finetune.folds``: the official test set of a
corpus that has one, MSP-Podcast's Test1; every group of a corpus without one, since a model from
another corpus never saw any of its speakers). Nothing of the target reaches the model: it is used
as registered, its normalisation statistics are its training folds'.

Writes ``<output_dir>/evaluate/<model id>/``: ``metrics.json`` (UA / WA / macro-F1 over the target's
test utterances, per test group and pooled, the source and target corpora and protocols),
``predictions.csv``, ``confusion_matrix.png`` and ``results.md``. Beside the model, the field's
standard baseline (:func:`reference`: openSMILE eGeMAPS functionals + logistic regression trained
on the same source groups) is scored on the same utterances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd

from serray import storage


def model_encoder_overrides(features: Dict[str, Any], model_dir: Path) -> list:
    """``encoder.*`` overrides that make the target's features with the model's encoder."""
    from serray.data.encoders import BUILTIN_ENCODERS, encoder_section
    from serray.train.checkpoint import ENCODER_DIR

    name = str(features["encoder"])
    bundled = model_dir / ENCODER_DIR
    if name not in BUILTIN_ENCODERS and (bundled / "config.json").is_file() and not Path(name).is_dir():
        name = str(bundled)
    enc = encoder_section(features, name)
    out = [f"encoder.name={name}", f"encoder.layers={json.dumps(enc['layers'])}", f"encoder.sample_rate={enc['sample_rate']}"]
    if name in ("fbank", "fbank_pitch"):
        out.append(f"encoder.num_mel_bins={enc['num_mel_bins']}")
    return out


def score(preds: pd.DataFrame, labels) -> Dict[str, Any]:
    """UA / WA / macro-F1 (fractions) of a predictions frame, pooled and per test group."""
    from serray.train.metrics import classification_metrics

    index = {l: i for i, l in enumerate(labels)}

    def metrics(df):
        m = classification_metrics([index[l] for l in df["label"]], [index[l] for l in df["pred"]])
        return {k: float(m[k]) for k in ("ua", "wa", "macro_f1")} | {"n_test": int(len(df))}

    return {"pooled": metrics(preds),
            "groups": [{"group": int(g), **metrics(df)} for g, df in preds.groupby("session", sort=True)]}


def source_training(entry: Dict[str, Any], labels) -> Optional[pd.DataFrame]:
    """The source corpus's four-class utterances the entry's model trained on (every group of its run
    but the entry's test fold), from the manifest its saved config names; None when that manifest is
    not on this machine."""
    import yaml

    from serray.data.iemocap import read_manifest
    from serray.errors import SerrayError

    try:
        saved = yaml.safe_load(storage.read_text(storage.join(entry["path"], "config.yaml"))) or {}
        source = read_manifest(saved["data"]["manifest"])
    except (SerrayError, OSError, KeyError, TypeError, AttributeError):
        return None
    held = entry.get("model_fold")
    sessions = [int(g) for g in saved["data"].get("sessions") or sorted(source["session"].unique())]
    return source[source["label"].isin(labels) & source["session"].isin([g for g in sessions if g != held])]


def _fingerprint(path: str):
    """Size and a hash of the first 64 KiB: the same audio under another name, in another layout, or
    through a link is the same file to this check."""
    import hashlib

    try:
        with open(path, "rb") as f:
            head = f.read(65536)
        return Path(path).stat().st_size, hashlib.blake2b(head, digest_size=16).hexdigest()
    except OSError:
        return None


def check_unseen(train: Optional[pd.DataFrame], target_paths: Sequence[str], echo: Callable[[str], Any] = print) -> None:
    """Cross-corpus scores are only meaningful on audio the model never trained on: refuse a target
    whose test files hold audio of the model's training data (the same bytes under any name, layout or
    link: :func:`_fingerprint`).

    Raises:
        DataError: naming how many and one of them.
    """
    from serray.errors import DataError

    if train is None:
        echo("note: the model's training manifest is not on this machine; cannot check that the target's test "
             "files are unseen")
        return
    seen = {i for i in map(_fingerprint, train["path"]) if i is not None}
    overlap = [p for p in target_paths if _fingerprint(p) in seen]
    if overlap:
        raise DataError(f"{len(overlap)} of the target's {len(target_paths)} test files are files the model trained on "
                        f"(e.g. {overlap[0]}): score another corpus, other speakers, or the model's own test fold")


def reference(entry: Dict[str, Any], target_rows: pd.DataFrame, target_paths: Dict[str, str], labels,
              kind: str = "egemaps", echo: Callable[[str], Any] = print,
              train: Optional[pd.DataFrame] = None) -> Optional[Dict[str, Any]]:
    """The field's standard baseline beside the model: openSMILE ``kind`` functionals + logistic
    regression trained on the model's own training groups of the source corpus (every group but the
    entry's test fold), its C chosen by a leave-one-group-out cross-validation over those groups;
    scored on the target's test utterances. None (with a warning) when the source manifest is not on
    this machine."""
    from serray import baselines
    from serray.data.opensmile_features import functionals

    train = source_training(entry, labels) if train is None else train
    if train is None:
        echo("reference column skipped: the source corpus's manifest is not readable on this machine")
        return None
    echo(f"reference: openSMILE {kind} functionals + logistic regression, trained on {len(train)} source utterances "
         f"(groups {sorted(set(train['session']))}), scored on {len(target_rows)} target utterances")
    x_train = functionals(train["path"].tolist(), kind)
    y_train = np.array([labels.index(lab) for lab in train["label"]])
    choice = baselines.choose_recipe(x_train, y_train, train["session"].to_numpy())
    x_test = functionals([target_paths[u] for u in target_rows["utt_id"]], kind)
    pred, _ = baselines.fit_predict(x_train, y_train, x_test, seed=0, C=choice["C"])
    preds = target_rows[["utt_id", "label", "session"]].assign(pred=[labels[i] for i in pred])
    return {"features": kind, "C": choice["C"], "source_cv_ua": choice["val_ua"], **score(preds, labels)}


def run_evaluate(cfg, model: Optional[str] = None, echo: Callable[[str], Any] = print,
                 reference_features: Optional[str] = "egemaps") -> Dict[str, Any]:
    """Score registry entry ``model`` (id; None: the best by validation UA) on the config's corpus,
    with an openSMILE reference column (``reference_features``: egemaps | compare | None)."""
    from serray import provenance
    from serray.config import derive, save_config
    from serray.data.featurize import featurize, featurize_summary
    from serray.data.features import session_paths
    from serray.pipeline import prepare_corpus
    from serray.errors import DataError
    from serray.predict import Predictor
    from serray.protocol import corpus_protocol
    from serray.registry import entry_evaluation, get_entry, model_dir
    from serray.train.folds import labelled_rows
    from serray.train.metrics import confusion
    from serray.train.results import _plot_confusion

    entry = get_entry(cfg.registry.dir, model, {"selection": None})
    local = model_dir(entry)
    predictor = Predictor.from_checkpoint(local)
    if not predictor.has_classes:
        raise DataError(f"model {entry['id']} predicts emotion dimensions only (finetune.task=dimensional); "
                        "cross-corpus evaluation scores the four classes (use a categorical or multitask model)")
    cfg = derive(cfg, model_encoder_overrides(predictor.features, Path(local)))
    source = entry_evaluation(entry)
    target = corpus_protocol(cfg)
    folds = [int(f) for f in cfg.finetune.folds]
    echo(f"model {entry['id']} (trained on {source.get('corpus') or 'iemocap'}, encoder "
         f"{predictor.features['encoder']}) -> {target['corpus']} ({storage.describe(cfg.data.root)}), test "
         f"{target['group_name']}s {folds}")
    prepare_corpus(cfg, echo)
    echo(featurize_summary(featurize(cfg)))
    rows = labelled_rows(cfg)
    rows = rows[rows["session"].isin(folds)]
    if rows.empty:
        from serray.errors import DataError

        raise DataError(f"{target['corpus']} has no four-class utterances in test groups {folds}")
    from serray.data.iemocap import read_manifest

    paths = read_manifest(cfg.data.manifest).set_index("utt_id")["path"].to_dict()
    train = source_training(entry, list(predictor.labels))
    check_unseen(train, [paths[u] for u in rows["utt_id"]], echo)
    preds = predictor.predict_parquet(session_paths(cfg.features.dir, folds), utt_ids=rows["utt_id"].tolist())
    preds = preds.merge(rows[["utt_id", "session"]], on="utt_id").sort_values("utt_id", ignore_index=True)
    result = score(preds, predictor.labels)
    if reference_features:
        result["reference"] = reference(entry, rows, paths, list(predictor.labels), reference_features, echo, train)
    out = Path(cfg.output_dir) / "evaluate" / entry["id"]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    summary = {"model": entry["id"], "source": {k: source.get(k) for k in ("corpus", "protocol", "folds")},
               "target": {**target, "root": storage.describe(cfg.data.root), "test_groups": folds},
               "labels": list(predictor.labels), **result,
               "mean": {k: result["pooled"][k] for k in ("ua", "wa", "macro_f1")},
               "plot_title": f"{entry['id']} on {target['corpus']}", "provenance": provenance.collect(cfg, folds)}
    storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))
    preds.to_csv(out / "predictions.csv", index=False)
    index = {l: i for i, l in enumerate(predictor.labels)}
    cm = confusion([index[l] for l in preds["label"]], [index[l] for l in preds["pred"]], len(predictor.labels))
    _plot_confusion(cm, out / "confusion_matrix.png", summary)
    summary["confusion"] = cm.tolist()
    text = markdown(summary)
    storage.write_text(out / "results.md", text)
    echo(text)
    echo(f"results in {out}: metrics.json, results.md, predictions.csv, confusion_matrix.png")
    return summary


def markdown(summary: Dict[str, Any]) -> str:
    """The cross-corpus table: per test group and pooled, and the confusion counts."""
    labels = summary["labels"]
    t = summary["target"]
    lines = [f"### model {summary['model']} ({summary['source'].get('corpus') or 'iemocap'}) on {t['corpus']} "
             f"({t['evaluation']}, test {t['group_name']}s {t['test_groups']})", "",
             f"| test {t['group_name']} | n_test | UA % | WA % | macro-F1 % |", "|---|---:|---:|---:|---:|"]
    for g in summary["groups"]:
        lines.append(f"| {g['group']} | {g['n_test']} | {100 * g['ua']:.2f} | {100 * g['wa']:.2f} | {100 * g['macro_f1']:.2f} |")
    p = summary["pooled"]
    lines.append(f"| **pooled** | {p['n_test']} | {100 * p['ua']:.2f} | {100 * p['wa']:.2f} | {100 * p['macro_f1']:.2f} |")
    ref = summary.get("reference")
    if ref:
        r = ref["pooled"]
        lines.append(f"| reference: {ref['features']} + logistic regression (C={ref['C']:g}), pooled | {r['n_test']} | "
                     f"{100 * r['ua']:.2f} | {100 * r['wa']:.2f} | {100 * r['macro_f1']:.2f} |")
    cm = np.asarray(summary.get("confusion", []))
    if cm.size:
        lines += ["", "confusion (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines += [f"| {labels[i]} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i in range(len(labels))]
    return "\n".join(lines) + "\n"
