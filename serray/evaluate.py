"""Cross-corpus evaluation: a registered model scored on another corpus's test split.

``serray evaluate registry.dir=runs/iemocap/registry data.corpus=crema-d data.root=/data/CREMA-D
output_dir=runs/on-cremad`` builds the target's manifest, featurizes it with the model's own frozen
encoder (its identity comes from the model, so features cannot be mixed), and predicts the
four-class utterances of the target's test groups (``finetune.folds``: the official test set of a
corpus that has one, MSP-Podcast's Test1; every group of a corpus without one, since a model from
another corpus never saw any of its speakers). Nothing of the target reaches the model: it is used
as registered, its normalisation statistics are its training folds'.

Evaluation is its own run: everything it writes is under ``<output_dir>/evaluate/``, never in a
source run's manifest or feature store, even when ``output_dir`` is the source run. The target's
manifest and features (its test groups only) are in ``<output_dir>/evaluate/<corpus>-<root hash>/``;
``<output_dir>/evaluate/<model id>/`` holds ``metrics.json`` (UA / WA / macro-F1 over the target's
test utterances, per test group and pooled, the source and target corpora and protocols),
``predictions.csv``, ``confusion_matrix.png`` and ``results.md``. Beside the model, the field's
standard baseline (:func:`reference`: openSMILE eGeMAPS functionals + logistic regression trained on
exactly the utterances the model's fold trained on, computed in parallel and cached) is scored on the
same utterances; a file it cannot read is skipped and listed, and the model's scores are written first.

The target must be audio the model never heard (:func:`check_unseen`): its test files are compared by
their decoded samples with every file of the source run's training groups and pre-training pool
(``pretrain.extra_audio`` too), so a re-encoded copy or one with another header is caught and two
different clips that merely start alike are not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from serray import storage


def model_encoder_overrides(features: Dict[str, Any], model_dir: Path) -> list:
    """``encoder.*`` overrides that make the target's features with the model's encoder."""
    from serray.data.features.encoders import BUILTIN_ENCODERS, encoder_section
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
    from serray.train.metrics import class_index, classification_metrics

    index = class_index(labels)

    def metrics(df):
        m = classification_metrics([index[l] for l in df["label"]], [index[l] for l in df["pred"]])
        return {k: float(m[k]) for k in ("ua", "wa", "macro_f1")} | {"n_test": int(len(df))}

    return {"pooled": metrics(preds),
            "groups": [{"group": int(g), **metrics(df)} for g, df in preds.groupby("session", sort=True)]}


def _saved_config(entry: Dict[str, Any]) -> Optional[dict]:
    import yaml

    try:
        return yaml.safe_load(storage.read_text(storage.join(entry["path"], "config.yaml"))) or {}
    except (OSError, ValueError):
        return None


def source_audio(entry: Dict[str, Any], labels) -> Optional[Dict[str, pd.DataFrame]]:
    """What the entry's model was made from, from the source run's manifest and its fold's split record:
    ``train`` (the utterances of ``labels`` its fold trained on: exactly, when the fold recorded its split,
    else every group of its run but its test fold) and ``heard`` (everything its training and
    pre-training read: the training groups' utterances, labelled or not, and ``pretrain.extra_audio``).
    None when the source manifest is not on this machine."""
    from serray.data.corpora.extra_audio import extra_audio_manifest
    from serray.data.corpora.base import read_manifest
    from serray.errors import SerrayError
    from serray.train.finetune import SPLIT_FILE

    saved = _saved_config(entry)
    try:
        source = read_manifest(saved["data"]["manifest"])
    except (SerrayError, OSError, KeyError, TypeError, AttributeError):
        return None
    held = entry.get("model_fold")
    sessions = [int(g) for g in saved["data"].get("sessions") or sorted(source["session"].unique())]
    groups = source[source["session"].isin([g for g in sessions if g != held])]
    train = groups[groups["label"].isin(labels)]
    record = storage.join(str(entry.get("finetune_dir") or ""), f"fold{held}", SPLIT_FILE)
    if entry.get("finetune_dir") and storage.is_file(record):
        ids = set(json.loads(storage.read_text(record))["train"])
        train = source[source["utt_id"].isin(ids) & source["label"].isin(labels)]  # of the classes scored
    heard = [groups[["utt_id", "path"]]]
    extra = list((saved.get("pretrain") or {}).get("extra_audio") or [])
    if extra:
        try:
            heard.append(extra_audio_manifest(extra)[["utt_id", "path"]])
        except (SerrayError, OSError):
            pass  # not on this machine: counted as unreadable below
    return {"train": train, "heard": pd.concat(heard, ignore_index=True)}



def _audio_fingerprint(path: str) -> Optional[str]:
    """A hash of the decoded samples (mono, 16 kHz, 16-bit): the same audio re-encoded (FLAC, float, WAVE
    EXTENSIBLE), with another header or metadata chunk, under another name or behind a link hashes the
    same; two clips that differ anywhere do not. None when the file cannot be decoded here."""
    import hashlib

    from serray.data.audio import load_audio
    from serray.errors import AudioError

    try:
        x = load_audio(path, 16000)
    except (AudioError, OSError):
        return None
    q = np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    return hashlib.blake2b(q.tobytes(), digest_size=16).hexdigest()


def check_unseen(heard: Optional[pd.DataFrame], target_paths: Sequence[str], echo: Callable[[str], Any] = print,
                 fingerprints: Optional[Callable[[Sequence[str]], list]] = None) -> None:
    """Cross-corpus scores are only meaningful on audio the model never heard: refuse a target whose test
    files hold audio of the model's training or pre-training data (:func:`_audio_fingerprint`: the same
    samples under any name, layout, container or header). Says how many source files could not be read.

    Raises:
        DataError: naming how many and one of them.
    """
    from serray.errors import DataError

    if heard is None:
        echo("note: the model's training manifest is not on this machine; cannot check that the target's test "
             "files are unseen")
        return
    fingerprints = fingerprints or (lambda paths: [_audio_fingerprint(p) for p in paths])
    source = fingerprints(list(heard["path"]))
    unreadable = sum(f is None for f in source)
    seen = {f for f in source if f is not None}
    target = fingerprints(list(target_paths))
    overlap = [p for p, f in zip(target_paths, target) if f is not None and f in seen]
    if overlap:
        raise DataError(f"{len(overlap)} of the target's {len(target_paths)} test files hold audio the model trained or "
                        f"pre-trained on (e.g. {overlap[0]}): score another corpus, other speakers, or the model's own "
                        "test fold")
    echo(f"unseen-audio check: {len(target_paths)} target files against {len(source)} source files (training and "
         f"pre-training): no overlap" + (f"; {unreadable} source files could not be read here and were not compared"
                                        if unreadable else ""))


def _functionals_one(path: str, kind: str) -> Optional[list]:
    """One file's openSMILE functionals (None when it cannot be read or is too short)."""
    from serray.data.features.opensmile import functionals
    from serray.errors import SerrayError

    try:
        return functionals([path], kind)[0].tolist()
    except (SerrayError, OSError, ValueError, RuntimeError):
        return None


def cached_map(cfg, paths: Sequence[str], fn: Callable[[str], Any], cache_file: Path) -> list:
    """``fn(path)`` of every path, computed in parallel (Ray tasks over chunks of files) and cached in a
    Parquet file keyed by (path, size, modification time): a second evaluation of the same source or
    target decodes nothing again. A value of None (an unreadable file) is not cached."""
    import os

    import ray

    def key(p):
        try:
            st = os.stat(p)
            return f"{p}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return None

    keys = [key(p) for p in paths]
    cache = {}
    if cache_file.is_file():
        df = pd.read_parquet(cache_file)
        cache = dict(zip(df["key"], df["value"]))
    todo = sorted({(k, p) for k, p in zip(keys, paths) if k is not None and k not in cache})
    if todo:
        from serray.ray_utils import init_ray

        init_ray(cfg)
        task = ray.remote(num_cpus=1)(lambda chunk: [json.dumps(fn(p)) for p in chunk])
        chunk = max(1, len(todo) // (4 * max(1, int(ray.cluster_resources().get("CPU", 1)))) + 1)
        parts = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
        results = ray.get([task.remote([p for _, p in part]) for part in parts])
        fresh = {k: v for part, vals in zip(parts, results) for (k, _), v in zip(part, vals) if v != "null"}
        cache.update(fresh)
        if fresh:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"key": list(cache), "value": list(cache.values())}).to_parquet(cache_file, index=False)
    return [json.loads(cache[k]) if k is not None and k in cache else None for k in keys]


def reference(cfg, train: Optional[pd.DataFrame], target_rows: pd.DataFrame, target_paths: Dict[str, str], labels,
              kind: str = "egemaps", echo: Callable[[str], Any] = print,
              cache_dir: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """The field's standard baseline beside the model: openSMILE ``kind`` functionals + logistic
    regression trained on the utterances the model's fold trained on (:func:`source_audio`), its C
    chosen by a leave-one-group-out cross-validation over their groups; scored on the target's test
    utterances. Functionals are computed in parallel and cached (:func:`cached_map`); a file that cannot
    be read is skipped and listed (``skipped``). None (with a note) when the source manifest is not on
    this machine."""
    from functools import partial

    from serray.train import baselines

    if train is None:
        echo("reference column skipped: the source corpus's manifest is not readable on this machine")
        return None
    echo(f"reference: openSMILE {kind} functionals + logistic regression, trained on {len(train)} source utterances "
         f"(groups {sorted(set(train['session']))}), scored on {len(target_rows)} target utterances")
    cache = (cache_dir or Path(".")) / f"{kind}_functionals.parquet"
    target_files = [target_paths[u] for u in target_rows["utt_id"]]
    values = cached_map(cfg, [*train["path"], *target_files], partial(_functionals_one, kind=kind), cache)
    x_train, x_test = values[: len(train)], values[len(train):]
    skipped = [p for p, v in zip([*train["path"], *target_files], values) if v is None]
    ok_train = [v is not None for v in x_train]
    ok_test = np.array([v is not None for v in x_test])
    if skipped:
        echo(f"reference: {len(skipped)} files could not be read and are left out, e.g. {skipped[0]}")
    if not any(ok_train) or not ok_test.any():
        return {"features": kind, "skipped": skipped, "pooled": None, "groups": []}
    train_ok = train[ok_train]
    x_tr = np.asarray([v for v in x_train if v is not None], dtype=np.float64)
    y_train = np.array([labels.index(lab) for lab in train_ok["label"]])
    choice = baselines.choose_recipe(x_tr, y_train, train_ok["session"].to_numpy())
    pred, _ = baselines.fit_predict(x_tr, y_train, np.asarray([v for v in x_test if v is not None], dtype=np.float64),
                                    seed=0, C=choice["C"])
    preds = target_rows[ok_test][["utt_id", "label", "session"]].assign(pred=[labels[i] for i in pred])
    return {"features": kind, "C": choice["C"], "source_cv_ua": choice["val_ua"], "n_train": int(len(train_ok)),
            "skipped": skipped, **score(preds, labels)}


def run_evaluate(cfg, model: Optional[str] = None, echo: Callable[[str], Any] = print,
                 reference_features: Optional[str] = "egemaps") -> Dict[str, Any]:
    """Score registry entry ``model`` (id; None: the best by validation UA) on the config's corpus,
    with an openSMILE reference column (``reference_features``: egemaps | compare | None)."""
    from serray import provenance
    from serray.config import derive, save_config
    from serray.data.features.featurize import featurize, featurize_summary
    from serray.data.features.training import session_paths
    from serray.data.prepare import prepare_corpus
    from serray.errors import DataError
    from serray.predict import Predictor
    from serray.train.protocol import corpus_protocol
    from serray.train.registry import entry_evaluation, get_entry, model_dir
    from serray.data.corpora import classes_of
    from serray.train.folds import labelled_rows
    from serray.train.metrics import class_index, confusion
    from serray.train.results import _plot_confusion

    entry = get_entry(cfg.registry.dir, model, {"selection": None})
    local = model_dir(entry)
    predictor = Predictor.from_checkpoint(local)
    if not predictor.has_classes:
        raise DataError(f"model {entry['id']} predicts emotion dimensions only (finetune.task=dimensional); "
                        "cross-corpus evaluation scores classes (use a categorical or multitask model)")
    folds = [int(f) for f in cfg.finetune.folds]
    base = Path(cfg.output_dir) / "evaluate"
    work = base / target_key(cfg)  # the target's own manifest and features: never a source run's
    cfg = derive(cfg, [*model_encoder_overrides(predictor.features, Path(local)), f"data.manifest={work / 'manifest.parquet'}",
                       f"features.dir={work / 'features'}", f"data.sessions={json.dumps(folds)}",
                       f"pretrain.sessions={json.dumps(folds)}", "pretrain.use_unlabelled=false", "pretrain.extra_audio=[]",
                       "finetune.val_split=speaker"])
    source = entry_evaluation(entry)
    target = corpus_protocol(cfg)
    echo(f"model {entry['id']} (trained on {source.get('corpus') or 'iemocap'}, encoder "
         f"{predictor.features['encoder']}) -> {target['corpus']} ({storage.describe(cfg.data.root)}), test "
         f"{target['group_name']}s {folds} (only they are featurized, in {work})")
    prepare_corpus(cfg, echo)
    echo(featurize_summary(featurize(cfg)))
    rows = labelled_rows(cfg)
    rows = rows[rows["session"].isin(folds)]
    if rows.empty:
        raise DataError(f"{target['corpus']} has no utterances of data.classes in test groups {folds}")
    labels = align_classes(list(predictor.labels), classes_of(cfg), sorted(set(rows["label"])), entry["id"],
                           target["corpus"])
    from serray.data.corpora.base import read_manifest

    paths = read_manifest(cfg.data.manifest).set_index("utt_id")["path"].to_dict()
    made_of = source_audio(entry, labels)
    check_unseen(None if made_of is None else made_of["heard"], [paths[u] for u in rows["utt_id"]], echo,
                 fingerprints=lambda ps: cached_map(cfg, ps, _audio_fingerprint, base / "cache" / "audio_fingerprints.parquet"))
    preds = predictor.predict_parquet(session_paths(cfg.features.dir, folds), utt_ids=rows["utt_id"].tolist())
    preds = preds.drop(columns=[c for c in ("label",) if c in preds.columns]).merge(
        rows[["utt_id", "label", "session"]], on="utt_id").sort_values("utt_id", ignore_index=True)
    if labels != list(predictor.labels):  # the model's classes the target lacks take no part: argmax over the shared
        preds["pred"] = preds[[f"p_{c}" for c in labels]].to_numpy().argmax(1)
        preds["pred"] = [labels[i] for i in preds["pred"]]
    out = base / entry["id"]
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    summary = {"model": entry["id"], "source": {k: source.get(k) for k in ("corpus", "protocol", "folds")},
               "target": {**target, "root": storage.describe(cfg.data.root), "test_groups": folds},
               "labels": labels, "model_labels": list(predictor.labels), **score(preds, labels),
               "plot_title": f"{entry['id']} on {target['corpus']}", "provenance": provenance.collect(cfg, folds)}
    summary["mean"] = {k: summary["pooled"][k] for k in ("ua", "wa", "macro_f1")}
    preds.to_csv(out / "predictions.csv", index=False)
    index = class_index(labels)
    cm = confusion([index[l] for l in preds["label"]], [index[l] for l in preds["pred"]], len(labels))
    summary["confusion"] = cm.tolist()
    storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))  # the model's scores first
    if reference_features:
        summary["reference"] = reference(cfg, None if made_of is None else made_of["train"], rows, paths,
                                         labels, reference_features, echo, base / "cache")
        storage.write_text(out / "metrics.json", json.dumps(summary, indent=2))
    _plot_confusion(cm, out / "confusion_matrix.png", summary, labels)
    text = markdown(summary)
    storage.write_text(out / "results.md", text)
    echo(text)
    echo(f"results in {out}: metrics.json, results.md, predictions.csv, confusion_matrix.png")
    return summary


def align_classes(model: List[str], target: Sequence[str], present: Sequence[str], model_id: str,
                  corpus: str) -> List[str]:
    """The classes a cross-corpus score covers: the model's classes the target has (``data.classes`` of the
    target), in the model's order. The model's other classes take no part (their outputs are left out of
    the argmax); a target class the model does not predict is refused.

    Raises:
        DataError: the target holds classes the model lacks, or shares fewer than two with it.
    """
    from serray.errors import DataError

    lacking = [c for c in present if c not in model]
    shared = [c for c in model if c in set(target)]
    if lacking or len(shared) < 2:
        keep = [c for c in target if c in model]
        raise DataError(f"{corpus} (data.classes: {list(target)}) holds classes model {model_id} does not predict: "
                        f"{lacking or 'fewer than two shared'} (the model's: {model}); score the shared ones with "
                        f"data.classes=[{','.join(keep)}], or map the others in data.label_map")
    return shared


def target_key(cfg) -> str:
    """``<corpus>-<hash of its root>``: the directory a target corpus's manifest and features live in."""
    import hashlib

    root = str(cfg.data.root) if storage.is_uri(str(cfg.data.root)) else str(Path(cfg.data.root).expanduser().resolve())
    return f"{cfg.data.corpus}-{hashlib.sha256(root.encode()).hexdigest()[:8]}"


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
    if ref and ref.get("pooled"):
        r = ref["pooled"]
        lines.append(f"| reference: {ref['features']} + logistic regression (C={ref['C']:g}), pooled | {r['n_test']} | "
                     f"{100 * r['ua']:.2f} | {100 * r['wa']:.2f} | {100 * r['macro_f1']:.2f} |")
    cm = np.asarray(summary.get("confusion", []))
    if cm.size:
        lines += ["", "confusion (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        lines += [f"| {labels[i]} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i in range(len(labels))]
    return "\n".join(lines) + "\n"
