"""Any labelled audio: a CSV ``path,label[,speaker][,gender][,group]`` (``data.corpus: csv``).

``data.root`` is the CSV file, or a directory holding ``labels.csv``. Relative paths are relative to
the CSV's folder. ``label`` is one of the four classes (``neu hap sad ang``) or a common name of one
(neutral, happy, happiness, joy, sad, sadness, angry, anger); any other label must be mapped or
dropped in ``data.label_map`` (``data.label_map={fear: '', excited: hap}``), or the CSV is refused
with the rows that hold it.

Protocol: speaker-grouped k-fold (``data.num_folds``) over ``speaker``; or the CSV's own ``group``
column (integers 1..``data.num_folds``, e.g. a fixed train / test split or your own folds, checked
speaker-disjoint like every protocol). Without a ``speaker`` column every file is its own speaker:
the folds are then *not* speaker-independent, and the manifest says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from serray.data.corpora.base import (Corpus, ManifestReport, cfg_get, kfold_groups, label_space, apply_labels, row,
                                speaker_folds)
from serray.errors import DataError

log = logging.getLogger(__name__)

NAMES = {"neu": "neu", "hap": "hap", "sad": "sad", "ang": "ang", "neutral": "neu", "happy": "hap",
         "happiness": "hap", "joy": "hap", "sadness": "sad", "angry": "ang", "anger": "ang"}
REQUIRED = ("path", "label")


def _csv_path(root) -> Path:
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / "labels.csv"
    if not path.is_file():
        raise DataError(f"labelled CSV not found: {path} (data.corpus=csv: set data.root to a CSV with columns "
                        f"path,label[,speaker][,gender][,group], or to a directory holding labels.csv)")
    return path.resolve()


def _rows_of(df: pd.DataFrame, mask) -> str:
    lines = [int(i) + 2 for i in df.index[mask][:5]]  # +2: the header is line 1
    return ", ".join(map(str, lines)) + (" ..." if int(mask.sum()) > 5 else "")


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    path = _csv_path(root)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read {path} as CSV: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; a labelled CSV has path,label[,speaker][,gender][,group] "
                        f"(found {list(df.columns)})")
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    empty = (df["path"] == "") | (df["label"] == "")
    if empty.any():
        raise DataError(f"{path}: rows {_rows_of(df, empty)} have an empty path or label")
    k = len(kfold_groups(data_cfg))
    if "group" in df.columns:
        group = pd.to_numeric(df["group"], errors="coerce")
        bad = group.isna() | (group % 1 != 0) | (group < 1) | (group > k)
        if bad.any():
            raise DataError(f"{path}: rows {_rows_of(df, bad)} have a group that is not an integer in 1..{k} "
                            f"(data.num_folds={k})")
        groups = group.astype(int).tolist()
        empty_groups = sorted(set(range(1, k + 1)) - set(groups))
        if empty_groups:
            raise DataError(f"{path}: groups {empty_groups} hold no rows; set data.num_folds to the number of groups")
    if "speaker" in df.columns and (df["speaker"] == "").any():
        blank = df["speaker"] == ""
        raise DataError(f"{path}: rows {_rows_of(df, blank)} have no speaker; fill them in (folds are grouped by speaker, "
                        "and a blank would make every file its own speaker), or leave out the speaker column for a "
                        "corpus without speaker identities (then the folds are not speaker-independent)")
    has_speaker = "speaker" in df.columns
    if not has_speaker:
        log.warning("%s has no speaker for every row: each file is its own speaker, so the folds are NOT "
                    "speaker-independent", path)
    speakers = df["speaker"].tolist() if has_speaker else [f"utt{i}" for i in range(len(df))]
    genders = df["gender"].str.upper().str[:1].where(lambda g: g.isin(["F", "M"]), "").tolist() \
        if "gender" in df.columns else [""] * len(df)
    if "group" not in df.columns:
        spk_gender = dict(zip(speakers, genders))
        folds = speaker_folds(spk_gender, k, CORPUS.title)
        groups = [folds[s] for s in speakers]
    if "group" in df.columns:  # the CSV's own groups must keep each speaker in one
        per_speaker = pd.DataFrame({"speaker": speakers, "group": groups}).groupby("speaker")["group"].nunique()
        split = sorted(per_speaker[per_speaker > 1].index)
        if split:
            rows = df.index[df["speaker"].isin(split)] if has_speaker else df.index[:0]
            raise DataError(f"{path}: speakers {split[:5]} appear in more than one group (rows "
                            f"{', '.join(str(i + 2) for i in rows[:8])}{' ...' if len(rows) > 8 else ''}); a fold group "
                            "must hold all of a speaker's files, or the test speakers would also train")
    ids = [Path(p).with_suffix("").as_posix().lstrip("./").replace("/", "__") for p in df["path"]]
    dup = pd.Series(ids).duplicated(keep=False)
    if dup.any():
        pairs = ", ".join(f"{df['path'].iloc[i]!r} (line {i + 2})" for i in list(dup[dup].index)[:6])
        raise DataError(f"{path}: {int(dup.sum())} files get the same utterance id from their paths: {pairs}; "
                        "rename or move them so that no two paths differ only in their extension or in '/' vs '__'")
    entries = []
    for i, (p, utt, label, spk, gender, g) in enumerate(zip(df["path"], ids, df["label"], speakers, genders, groups)):
        audio = Path(p).expanduser()
        audio = audio if audio.is_absolute() else path.parent / audio
        entries.append({**row(utt, g, spk, gender, label, "", audio), "where": f"{path.name}:{i + 2}"})
    space = label_space(CORPUS, data_cfg, found=sorted(set(df["label"])))
    report = apply_labels(entries, space, keep_unlabelled, CORPUS, {})
    if not has_speaker:
        report.notes.append("no speaker column: each file is its own speaker, so the folds are NOT speaker-independent")
    return report


CORPUS = Corpus(
    name="csv", title="labelled CSV", group_name="fold", protocol="speaker_kfold",
    layout="a CSV path,label[,speaker][,gender][,group] (or a directory holding labels.csv)",
    raw_labels=NAMES, build=build, groups=kfold_groups,
)
