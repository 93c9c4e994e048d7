"""Folds, corpus-agnostic: the rows of a run's fold groups, one fold's train / validation / test
split, the adapter's pre-training pool and the leakage audit of a fold, and the fold's plan that
brings them together (:func:`plan_fold`).

Pre-training, fine-tuning, the ablation, sweeps and cross-corpus evaluation all call these. A fold
holds out one *fold group* (``session`` in the manifest and the feature store: an IEMOCAP session,
a group of speakers, one speaker, an official test set; :mod:`serray.data.corpora.base`); validation comes
from the other groups by speaker, dialog, utterance or a designated group; :func:`audit_fold`
asserts that no speaker or utterance of the test group reaches training or validation, and under
the inductive protocol neither the adapter's pre-training pool nor the normalisation statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from serray.data.corpora import classes_of
from serray.data.corpora.extra_audio import EXTRA_SESSION
from serray.data.features.featurize import feature_stats
from serray.data.features.training import read_rows, training_data
from serray.train.protocol import protocol
from serray.train.tasks import task_of


# ---------------------------------------------------------------- rows and splits


def manifest_rows(cfg, sessions: Sequence[int], labelled_only: bool) -> pd.DataFrame:
    """utt_id / label / speaker / dialog / session of the manifest's utterances of ``sessions`` that the
    feature store holds: labels, speakers and fold groups as the **current** manifest says them (an
    edited CSV or label map, a changed ``data.num_folds`` or ``data.protocol``), never as they were when
    the features were stored; a stored row the manifest does not list is never read.

    Raises:
        DataError: rows the manifest wants are stored under another fold group than it gives them now
            (run ``serray featurize``: it moves them).
    """
    from serray.data.features.featurize import stored_utterances
    from serray.data.features.training import session_paths
    from serray.data.corpora.base import read_manifest
    from serray.errors import DataError

    session_paths(cfg.features.dir, sessions)  # a clear error when the store holds none of them
    manifest = read_manifest(cfg.data.manifest)
    rows = manifest[manifest["session"].isin([int(s) for s in sessions])]
    if labelled_only:
        rows = rows[rows["label"].isin(classes_of(cfg))]
    stored = stored_utterances(cfg.features.dir).rename(columns={"session": "stored_in"})
    rows = rows[["utt_id", "label", "speaker", "dialog", "session"]].merge(stored, on="utt_id", how="inner")
    moved = rows[rows["session"] != rows["stored_in"]]
    if len(moved):
        raise DataError(f"{len(moved)} utterances are stored under another fold group than the manifest gives them now "
                        f"(e.g. {moved['utt_id'].iloc[0]}: stored in {int(moved['stored_in'].iloc[0])}, manifest "
                        f"{int(moved['session'].iloc[0])}); run `serray featurize` (or the pipeline) to move them")
    return rows.drop(columns="stored_in").sort_values("utt_id", kind="stable").reset_index(drop=True)


def labelled_rows(cfg) -> pd.DataFrame:
    """utt_id / label / speaker / dialog / session of the utterances of ``data.sessions`` with a class
    (:func:`manifest_rows`)."""
    rows = manifest_rows(cfg, cfg.data.sessions, labelled_only=True)
    if str(cfg.data.corpus) == "iemocap":  # IEMOCAP's dialog is the utterance id without its turn
        rows["dialog"] = rows["utt_id"].str.rsplit("_", n=1).str[0]
    return rows


def _holdout_groups(groups: pd.Series, fraction: float, seed: int) -> set:
    """``round(fraction x #groups)`` (at least 1) groups drawn with the seed."""
    names = sorted(set(groups))
    n = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    rng = np.random.default_rng(seed)
    return set(rng.choice(names, size=n, replace=False).tolist()) if n > 0 else set()


def split_fold(rows: pd.DataFrame, test_session: int, val_fraction: float, seed: int,
               val_split: str = "random", val_groups: Sequence[int] = ()) -> Dict[str, pd.DataFrame]:
    """Leave-one-group-out split: test = that fold group (an IEMOCAP session, a group of speakers,
    one speaker, an official test set); train / val from the other groups.

    ``val_split``: ``speaker`` holds out whole speakers (validation shares no speaker with
    training), ``dialog`` whole dialogs (both speakers of a conversation), ``random`` a stratified
    random share of the utterances, ``group`` the groups ``val_groups`` (an official development set).

    Raises:
        AssertionError: a speaker of the test session appears in training or validation, or a
            validation speaker in training under ``val_split=speaker``.
    """
    from sklearn.model_selection import train_test_split

    if "session" not in rows:
        rows = rows.assign(session=rows["speaker"].str.slice(3, 5).astype(int))
    test = rows[rows["session"] == test_session]
    rest = rows[rows["session"] != test_session]
    rng_seed = seed * 1009 + test_session
    if val_split in ("speaker", "dialog"):
        key = "speaker" if val_split == "speaker" else "dialog"
        if key == "dialog" and "dialog" not in rest:
            rest = rest.assign(dialog=rest["utt_id"].str.rsplit("_", n=1).str[0])
        held = _holdout_groups(rest[key], val_fraction, rng_seed)
        val, train = rest[rest[key].isin(held)], rest[~rest[key].isin(held)]
    elif val_split == "group":
        if not val_groups or test_session in val_groups:
            raise ValueError(f"val_split=group needs val_groups without the test group {test_session}, got {list(val_groups)}")
        val, train = rest[rest["session"].isin(list(val_groups))], rest[~rest["session"].isin(list(val_groups))]
    elif val_split == "random":
        n_val = math.ceil(val_fraction * len(rest))  # sklearn's rounding of a float test_size
        counts = rest["label"].value_counts()
        stratified = counts.min() >= 2 and n_val >= len(counts) and len(rest) - n_val >= len(counts)
        train, val = train_test_split(rest, test_size=val_fraction, random_state=seed + test_session,
                                      stratify=rest["label"] if stratified else None)
    else:
        raise ValueError(f"val_split must be speaker, dialog, random or group, got {val_split!r}")
    if val.empty and not rest.empty:
        from serray.errors import DataError

        raise DataError(f"fold {test_session}: the validation part (finetune.val_split={val_split}, val_fraction "
                        f"{val_fraction}) is empty; raise finetune.val_fraction or choose another finetune.val_split")
    leak = set(test["speaker"]) & (set(train["speaker"]) | set(val["speaker"]))
    assert not leak, f"speaker leakage into fold {test_session}: {sorted(leak)}"
    if val_split == "speaker":
        shared = set(val["speaker"]) & set(train["speaker"])
        assert not shared, f"validation speakers also in training for fold {test_session}: {sorted(shared)}"
    return {"train": train.sort_values("utt_id"), "val": val.sort_values("utt_id"), "test": test.sort_values("utt_id")}


def split_digest(split: Dict[str, pd.DataFrame]) -> str:
    """A short hash of what a fold trains, validates and tests on: every row's part, id, class and group
    (a stored fold result is reused only while this stays the same)."""
    import hashlib

    lines = sorted(f"{part}|{u}|{l}|{g}" for part, rows in split.items()
                   for u, l, g in zip(rows["utt_id"], rows["label"], rows["session"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def subsample_labels(df: pd.DataFrame, fraction: float, seed: int, label_col: str = "label") -> pd.DataFrame:
    """Keep ``fraction`` of the rows of every class (at least one each), seeded; order preserved."""
    from serray.train.stats import subsample_labels as _sub

    return _sub(df, fraction, seed, label_col)


def test_only_groups(cfg) -> List[int]:
    """The corpus's official test sets among ``data.sessions`` (MSP-Podcast: Test1, Test2)."""
    from serray.data import corpora

    return [int(g) for g in corpora.of(cfg).test_only_groups]


def training_groups(cfg, fold: Optional[int]) -> List[int]:
    """The fold groups a fold trains, validates and pre-trains on: ``data.sessions`` without the fold
    and without any official test set (:func:`test_only_groups`)."""
    held = set(test_only_groups(cfg))
    return [int(s) for s in cfg.data.sessions if s != fold and int(s) not in held]


def fold_split(cfg, fold: int) -> Dict[str, pd.DataFrame]:
    """The train / val / test rows of one fold (metadata only; training labels subsampled by
    ``finetune.label_fraction``). Under ``finetune.epoch_selection: inner_cv`` there is no validation
    part: every labelled row of the training groups trains (the epoch count comes from the inner folds)."""
    rows = labelled_rows(cfg)
    rows = rows[rows["session"].isin([fold, *training_groups(cfg, fold)])]  # no other official test set
    if str(cfg.finetune.get("epoch_selection", "val")) == "inner_cv":
        test, rest = rows[rows["session"] == fold], rows[rows["session"] != fold]
        leak = set(test["speaker"]) & set(rest["speaker"])
        assert not leak, f"speaker leakage into fold {fold}: {sorted(leak)}"
        split = {"train": rest.sort_values("utt_id"), "val": rest.iloc[:0], "test": test.sort_values("utt_id")}
    else:
        split = split_fold(rows, fold, cfg.finetune.val_fraction, cfg.seed, cfg.finetune.val_split,
                           list(cfg.finetune.val_groups))
    held = set(test_only_groups(cfg)) - {fold}
    assert not held & (set(split["train"]["session"]) | set(split["val"]["session"])), \
        f"leakage: fold {fold} trains or validates on an official test set ({sorted(held)})"
    if cfg.finetune.label_fraction < 1.0:
        split["train"] = subsample_labels(split["train"], cfg.finetune.label_fraction, cfg.seed * 7919 + fold)
    return split



def task_split(cfg, fold: int) -> Tuple[Dict[str, pd.DataFrame], Dict[str, Any]]:
    """:func:`fold_split` as the run's task needs it (``finetune.task``: a dimensional task keeps the
    rows with valid ratings), and the rows it dropped, counted per split and group."""
    return task_of(cfg).prepare_split(cfg, fold_split(cfg, fold))


# ---------------------------------------------------------------- pre-training pool


def pool_sessions(cfg, fold: Optional[int], feat_meta: dict) -> List[int]:
    """The sessions a pre-training reads: the fold's training sessions (per fold) or
    ``pretrain.sessions`` (shared), plus the extra-audio partition when it is stored."""
    if cfg.pretrain.per_fold:
        if fold is None:
            raise ValueError("pretrain.per_fold=true needs a fold")
        sessions = training_groups(cfg, fold)
    else:
        sessions = list(cfg.pretrain.sessions)
    extra = list(getattr(cfg.pretrain, "extra_audio", []) or [])
    if extra and str(EXTRA_SESSION) in (feat_meta.get("rows_per_session") or {}):
        sessions = [EXTRA_SESSION] + sessions
    return sessions


def pool_rows(cfg, sessions: List[int]):
    """utt_id / speaker / label / session of the pre-training pool: the manifest's stored utterances of
    those fold groups (:func:`manifest_rows`; every one with ``pretrain.use_unlabelled``, else the
    four-class ones) and the stored extra audio (session 0, which no manifest lists)."""
    groups = [s for s in sessions if s != EXTRA_SESSION]
    parts = [manifest_rows(cfg, groups, labelled_only=not getattr(cfg.pretrain, "use_unlabelled", False))
             [["utt_id", "label", "speaker", "session"]]] if groups else []
    if EXTRA_SESSION in sessions:
        parts.append(read_rows(cfg.features.dir, [EXTRA_SESSION], columns=("utt_id", "label", "speaker")))
    return pd.concat(parts, ignore_index=True).sort_values("utt_id", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- the audit


def audit_fold(fold: int, split: Dict[str, pd.DataFrame], pretrain_pool: Optional[dict], stats_sessions: List[int],
               protocol_name: str) -> Dict[str, Any]:
    """The leakage audit of one fold; raises when the protocol is broken.

    Always fatal: a test-session speaker or utterance in training or validation. Fatal under the
    inductive protocol (recorded under the transductive one): the test session or one of its speakers
    in the adapter's pre-training pool, or the test session among the normalisation statistics.

    Returns:
        What was checked: the test speakers, the pre-training sessions and the statistics' sessions.
    """
    test_spk = set(split["test"]["speaker"])
    test_utt = set(split["test"]["utt_id"])
    problems = []
    for part in ("train", "val"):
        if test_spk & set(split[part]["speaker"]) or test_utt & set(split[part]["utt_id"]):
            problems.append(f"test-session speakers/utterances in {part}")
    pool_sessions_ = list((pretrain_pool or {}).get("sessions", []))
    pool_speakers = set((pretrain_pool or {}).get("speakers", []))
    transductive = []
    if fold in pool_sessions_ or test_spk & pool_speakers:
        transductive.append(f"test session {fold} (speakers {sorted(test_spk & pool_speakers)}) in the adapter's pre-training pool")
    if fold in stats_sessions:
        transductive.append(f"test session {fold} in the normalisation statistics")
    if protocol_name == "inductive":
        problems += transductive
    if problems:
        raise AssertionError(f"leakage audit failed for fold {fold}: " + "; ".join(problems))
    return {"protocol": protocol_name, "test_speakers": sorted(test_spk), "pretrain_sessions": pool_sessions_,
            "stats_sessions": list(stats_sessions), "transductive_exposure": transductive}


# ---------------------------------------------------------------- one fold, decided in one place


@dataclass(frozen=True)
class FoldPlan:
    """What a fold trains, validates and tests on, decided and audited in one place: the split (as the
    task needs it), the sessions and values of its normalisation statistics, the leakage audit, the
    run's classes and the training data the loop reads."""

    split: Dict[str, pd.DataFrame]
    digest: str  # :func:`split_digest` of the split
    dropped: Dict[str, Any]  # rows a dimensional task dropped (no valid ratings), per split and group
    stats_sessions: List[int]
    stats: Tuple[Any, ...]  # (mean, std) of the stats sessions' frames
    audit: Dict[str, Any]
    classes: Tuple[str, ...]
    datasets: Dict[str, Any]  # ``train`` (and ``val``) :class:`~serray.data.features.training.TrainingData`


def plan_fold(cfg, fold: int, feat_meta: dict, pool: Optional[dict] = None) -> FoldPlan:
    """The :class:`FoldPlan` of fold ``fold``; raises (:func:`audit_fold`) when its test group reaches
    anything else. ``pool``: the pre-trained adapter's pool record (its sessions and speakers), or None
    without one. Every arm of a comparison normalises with the same sessions, the fold's pool (a
    pre-trained body brings the statistics its pre-training used: the same sessions under per-fold
    pre-training)."""
    split, dropped = task_split(cfg, fold)
    stats_sessions = pool_sessions(cfg, fold, feat_meta)
    audit = audit_fold(fold, split, pool, pool["sessions"] if pool else stats_sessions, protocol(cfg))
    return FoldPlan(split, split_digest(split), dropped, stats_sessions, tuple(feature_stats(feat_meta, stats_sessions)), audit,
                    tuple(classes_of(cfg)), fold_datasets(cfg, fold, split))


def fold_datasets(cfg, fold: int, split: Optional[Dict[str, pd.DataFrame]] = None) -> Dict[str, Any]:
    """The ``train`` and ``val`` :class:`~serray.data.features.training.TrainingData` of a fold (validation is
    always held in memory: compact float16 rows, decoded a batch at a time)."""
    split = split if split is not None else fold_split(cfg, fold)
    train_sessions = training_groups(cfg, fold)
    train = training_data(cfg.features.dir, train_sessions, split["train"]["utt_id"].tolist(),
                          cfg.features.cache_max_mb, seed=cfg.seed * 31 + fold)
    if split["val"].empty:  # inner cross-validation's final model: every training speaker trains
        return {"train": train}
    val = training_data(cfg.features.dir, train_sessions, split["val"]["utt_id"].tolist(), float("inf"))
    return {"train": train, "val": val}
