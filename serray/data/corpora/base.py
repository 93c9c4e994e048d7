"""What a corpus is to serray: a root directory turned into the manifest table, a label map to the
four classes, and an evaluation protocol expressed as integer *fold groups*.

Every corpus module (:mod:`serray.data.corpora.iemocap`, :mod:`serray.data.corpora.crema_d`,
:mod:`serray.data.corpora.ravdess`, :mod:`serray.data.corpora.emodb`, :mod:`serray.data.corpora.msp_podcast`,
:mod:`serray.data.corpora.labelled_csv`) defines one :class:`Corpus`; :mod:`serray.data.corpora` looks them
up by ``data.corpus``. Downstream code sees only the manifest:

* ``session`` is the **fold group** (1..K), the unit the protocol holds out: an IEMOCAP session, a
  group of actors of a speaker-grouped k-fold, one speaker of leave-one-speaker-out, or a part of an
  official split (MSP-Podcast: 1 = Test1, 2 = Development, 3 = Train). Features are partitioned by
  it, folds hold one group out, and the audit checks that no speaker of the held-out group reaches
  training.
* ``speaker`` is always the true speaker (never a dialog or a recording prefix), ``gender`` ``F`` /
  ``M`` or ``""`` when unknown.
* ``raw_label`` is the corpus's own label, ``label`` its class among :data:`LABELS` (``""``: no
  class; kept for pre-training only when ``pretrain.use_unlabelled``).

Label maps are explicit: a corpus declares every raw label it can hold, each mapped to a class or
dropped (``""``); ``data.label_map`` overrides entries (``{calm: neu}``). A raw label the map does not
list is an error naming it and where it occurs, never a silent filter.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from serray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LABELS: Tuple[str, ...] = ("neu", "hap", "sad", "ang")
"""The standard 4-class label set, in class-index order (``data.classes: four``, the default)."""

#: The class vocabulary of the corpora's own label sets (``data.classes: native``), in class-index order:
#: corpora that share an emotion share its name, and the four classes come first in every native set.
CLASS_NAMES: Dict[str, str] = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry", "fea": "fear",
                               "dis": "disgust", "sur": "surprise", "con": "contempt", "cal": "calm",
                               "bor": "boredom"}
#: Common names of the vocabulary's classes (a labelled CSV's own labels).
CLASS_ALIASES: Dict[str, str] = {
    **{c: c for c in CLASS_NAMES}, **{v: c for c, v in CLASS_NAMES.items()}, "happiness": "hap", "joy": "hap",
    "sadness": "sad", "anger": "ang", "fearful": "fea", "surprised": "sur", "disgusted": "dis", "bored": "bor"}
#: ``data.classes`` words (or a list of class names).
CLASS_SETTINGS = ("four", "native")

#: Emotion dimensions (``finetune.dimensions``) -> their manifest column (IEMOCAP's "activation" is arousal).
DIMENSION_COLUMNS: Dict[str, str] = {"valence": "valence", "arousal": "activation", "dominance": "dominance"}

MANIFEST_COLUMNS = [
    "utt_id", "session", "dialog", "method", "speaker", "gender", "raw_label", "label",
    "valence", "activation", "dominance", "start", "end", "duration", "path",
]

#: Evaluation protocols a corpus can declare (``metrics.json`` names the one a run used).
PROTOCOLS = {
    "leave_one_session_out": "leave-one-session-out",
    "speaker_kfold": "speaker-grouped {k}-fold",
    "leave_one_speaker_out": "leave-one-speaker-out",
    "official_split": "official split",
    "leave_one_corpus_out": "leave-one-corpus-out",
}


@dataclass
class ManifestReport:
    """What a parser kept, dropped and could not find."""

    kept: pd.DataFrame
    dropped: Dict[Tuple[int, str], int] = field(default_factory=dict)  # (group, raw_label) -> count
    missing_wav: List[str] = field(default_factory=list)  # labelled utterances whose audio does not exist
    malformed: List[str] = field(default_factory=list)  # "where: text" of unparseable entries
    unlabelled_kept: bool = False  # the `dropped` utterances are in `kept` with label "" (pre-training only)
    corpus: str = "IEMOCAP"
    group_name: str = "session"
    ignored: Dict[str, int] = field(default_factory=dict)  # decoys skipped on purpose (reason -> count)
    notes: List[str] = field(default_factory=list)  # what a user must know about these folds
    classes: Tuple[str, ...] = LABELS  # the run's classes in index order (data.classes)
    class_setting: str = "four"  # four | native | list

    def summary(self) -> str:
        """A per-group x class table of kept utterances of the run's classes plus the drop / missing counts."""
        df = self.kept
        lines = [f"{self.corpus} manifest: kept utterances per {self.group_name} x class"]
        df = df[df["label"].isin(self.classes)]
        if len(df):
            table = pd.crosstab(df["session"], df["label"]).reindex(columns=list(self.classes), fill_value=0)
            table.index.name = self.group_name
            table["total"] = table.sum(axis=1)
            table.loc["total"] = table.sum(axis=0)
            lines.append(table.to_string())
        else:
            lines.append("  (none)")
        if self.dropped:
            drop = pd.Series(self.dropped).unstack(fill_value=0)
            drop.index.name, drop.columns.name = self.group_name, "dropped"
            drop["total"] = drop.sum(axis=1)
            if self.unlabelled_kept:
                lines.append(f"label outside the {self._setup()}: {int(drop['total'].sum())}, "
                             f"kept with no {'4-class label' if self.class_setting == 'four' else 'class'} (pre-training only)")
            else:
                lines.append(f"dropped (label outside the {self._setup()}): {int(drop['total'].sum())}")
            lines.append(drop.to_string())
        if self.missing_wav:
            shown = ", ".join(self.missing_wav[:5]) + (" ..." if len(self.missing_wav) > 5 else "")
            lines.append(f"labelled utterances whose wav is missing (skipped): {len(self.missing_wav)}: {shown}")
        if self.malformed:
            lines.append(f"malformed utterance lines (skipped): {len(self.malformed)}: {self.malformed[0]}")
        if self.ignored:
            lines.append("ignored: " + ", ".join(f"{n} {why}" for why, n in sorted(self.ignored.items())))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _setup(self) -> str:
        return "4-class setup" if self.class_setting == "four" else f"{len(self.classes)} classes of data.classes"


@dataclass(frozen=True)
class Corpus:
    """One corpus: how to read its release, its labels and its protocol.

    Attributes:
        name: the ``data.corpus`` value.
        title: the name printed in tables.
        layout: what a root of this corpus holds (quoted when a root does not match).
        protocol: a key of :data:`PROTOCOLS`.
        raw_labels: every raw label the release can hold -> its default class (``""``: dropped).
        build: ``build(root, data_cfg, keep_unlabelled) -> ManifestReport``.
        groups: ``groups(data_cfg) -> [fold groups]`` (the default ``data.sessions``).
        test_groups: ``test_groups(data_cfg) -> [groups a fold tests]`` (the default ``finetune.folds``).
        group_name: what a fold group is called in tables (``session``, ``fold``, ``speaker``, ``split``).
        extra_groups: groups outside the default ``data.sessions`` that a run may add (MSP-Podcast's Test2).
        other_protocols: protocols ``data.protocol`` may choose instead of ``protocol`` (the corpus's
            ``build`` and ``groups`` follow it).
        test_only_groups: groups that are official test sets (MSP-Podcast's Test1 and Test2): a fold may
            test one, no fold trains, validates or pre-trains on any of them.
    """

    name: str
    title: str
    layout: str
    protocol: str
    raw_labels: Mapping[str, str]
    build: Callable[..., ManifestReport]
    groups: Callable[[Any], List[int]]
    test_groups: Optional[Callable[[Any], List[int]]] = None
    group_name: str = "fold"
    extra_groups: Tuple[int, ...] = ()  # groups a run may list in data.sessions beyond the default ones
    dimension_range: Optional[Tuple[float, float]] = None  # the V/A/D rating scale (None: no dimensions)
    other_protocols: Tuple[str, ...] = ()  # what data.protocol may choose instead (IEMOCAP: leave_one_speaker_out)
    test_only_groups: Tuple[int, ...] = ()  # official test sets: tested, never trained, validated or pre-trained on
    native: Optional[Mapping[str, str]] = None  # raw label -> the corpus's own class (data.classes: native);
    # None: the raw labels found in the data, named by CLASS_ALIASES where they name a known class (a CSV)

    def protocol_of(self, data_cfg) -> str:
        """``data.protocol`` when set (one of :attr:`other_protocols`), else the corpus's own."""
        return str(cfg_get(data_cfg, "protocol") or self.protocol)

    def group_name_of(self, data_cfg) -> str:
        """What a fold group is under the chosen protocol (``speaker`` for leave-one-speaker-out)."""
        return {"leave_one_speaker_out": "speaker", "leave_one_corpus_out": "corpus"}.get(self.protocol_of(data_cfg),
                                                                                          self.group_name)

    def evaluation_name(self, data_cfg) -> str:
        """The protocol in words, e.g. ``speaker-grouped 5-fold``."""
        return PROTOCOLS[self.protocol_of(data_cfg)].format(k=len(self.groups(data_cfg)))

    def default_folds(self, data_cfg) -> List[int]:
        return list(self.test_groups(data_cfg)) if self.test_groups else list(self.groups(data_cfg))


def cfg_get(data_cfg, key: str, default=None):
    """``data_cfg.key`` for a DictConfig, a dict or a namespace (tests pass plain ones)."""
    if isinstance(data_cfg, Mapping):
        return data_cfg.get(key, default)
    return getattr(data_cfg, key, default)


def kfold_groups(data_cfg) -> List[int]:
    """Groups 1..``data.num_folds`` of a speaker-grouped k-fold."""
    return list(range(1, int(cfg_get(data_cfg, "num_folds", 5) or 5) + 1))


# ---------------------------------------------------------------- labels


def class_setting(data_cfg) -> Any:
    """``data.classes``: ``"four"`` (the default), ``"native"`` or a tuple of class names.

    Raises:
        ConfigError: another word, a list of fewer than two names, a repeated or empty name.
    """
    value = cfg_get(data_cfg, "classes", "four")
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return "four"
    if isinstance(value, str):
        if value not in CLASS_SETTINGS:
            raise ConfigError(f"data.classes={value!r}: one of {', '.join(CLASS_SETTINGS)} or a list of class names "
                              "(e.g. data.classes=[neu,hap,sad,ang,fea])")
        return value
    names = tuple(str(c).strip() for c in value)
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"data.classes={list(names)}: a list of at least two distinct, non-empty class names")
    return names


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a run on one corpus: ``mapping`` raw label -> class (``""``: no class) and ``classes``
    in class-index order (what the model's outputs are)."""

    mapping: Dict[str, str]
    classes: Tuple[str, ...]
    setting: str  # four | native | list


def _native_map(corpus: Corpus, found: Iterable[str]) -> Dict[str, str]:
    if corpus.native is not None:
        return dict(corpus.native)
    return {raw: CLASS_ALIASES.get(raw.lower(), raw) for raw in found}


def _ordered(classes: Iterable[str]) -> Tuple[str, ...]:
    """Classes in index order: the vocabulary's (:data:`CLASS_NAMES`: the four first, and a class has the
    same rank in every corpus), then the others sorted."""
    have = set(classes) - {""}
    order = [c for c in CLASS_NAMES if c in have]
    return tuple(order + sorted(have - set(order)))


def label_space(corpus: Corpus, data_cfg, found: Iterable[str] = ()) -> LabelSpace:
    """The raw label -> class map of ``data.classes`` with ``data.label_map`` applied, and the class list.

    * ``four``: the corpus's map onto :data:`LABELS` (the classes are always those four, in that order);
    * ``native``: the corpus's own classes (:attr:`Corpus.native`; a CSV: its own labels), those no raw
      label reaches after ``data.label_map`` left out;
    * a list: the native map restricted to the listed classes (the others dropped), in the list's order.

    ``found``: the raw labels the data holds (a CSV's native classes are its labels).

    Raises:
        DataError: an override maps outside the class list, or a listed class no raw label reaches.
    """
    setting = class_setting(data_cfg)
    overrides = {str(raw): "" if cls is None else str(cls) for raw, cls in dict(cfg_get(data_cfg, "label_map") or {}).items()}
    found = [str(r) for r in found]
    if setting == "four":
        mapping, allowed = dict(corpus.raw_labels), LABELS
    else:
        mapping = _native_map(corpus, found)
        allowed = setting if isinstance(setting, tuple) else None
        if allowed is not None:
            mapping = {raw: cls if cls in allowed else "" for raw, cls in mapping.items()}
    for raw, cls in overrides.items():
        if allowed is not None and cls not in allowed and cls != "":
            raise DataError(f"data.label_map: {raw!r} -> {cls!r}: a label maps to one of {list(allowed)} "
                            f"or to '' (dropped)")
        mapping[raw] = cls
    if setting == "four":
        return LabelSpace(mapping, LABELS, "four")
    if corpus.native is None:  # the data's labels: only the labels found make classes
        reached = {mapping[r] for r in found if r in mapping}
    else:
        reached = set(mapping.values())
    if isinstance(setting, tuple):
        missing = [c for c in setting if c not in reached]
        if missing:
            raise DataError(f"data.classes lists {missing}, which no label of {corpus.title} reaches (its own classes: "
                            f"{list(_ordered(_native_map(corpus, found).values()))}; data.label_map "
                            "can map a raw label to one)")
        return LabelSpace(mapping, setting, "list")
    return LabelSpace(mapping, _ordered(reached), "native")


def native_classes(corpus: Corpus) -> Tuple[str, ...]:
    """A corpus's own classes in index order (empty for a CSV: its classes are its labels)."""
    return _ordered((corpus.native or {}).values())


def label_map(corpus: Corpus, overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The corpus's raw label -> four-class map (``""``: dropped) with ``data.label_map`` applied
    (:func:`label_space` with ``data.classes: four``)."""
    return label_space(corpus, {"label_map": dict(overrides or {})}).mapping


def check_labels(raws: Iterable[Tuple[str, str]], mapping: Mapping[str, str], corpus: str,
                 classes: Sequence[str] = LABELS) -> None:
    """Fail on raw labels the map does not list: ``raws`` holds ``(raw_label, where)`` pairs.

    Raises:
        DataError: naming each unknown label, how often and where it first occurs, and the fix.
    """
    unknown: Dict[str, List[str]] = {}
    for raw, where in raws:
        if raw not in mapping:
            unknown.setdefault(raw, []).append(where)
    if unknown:
        parts = [f"{raw!r} ({len(w)}x, e.g. {w[0]})" for raw, w in sorted(unknown.items())]
        raise DataError(
            f"{corpus}: labels the label map does not list: {', '.join(parts[:8])}"
            f"{' ...' if len(parts) > 8 else ''}. Map each to one of {list(classes)} or drop it with '', "
            f"e.g. data.label_map={{{next(iter(sorted(unknown)))}: ''}} (known: {sorted(mapping)})")


# ---------------------------------------------------------------- folds


def speaker_folds(speakers: Mapping[str, str], k: int, corpus: str) -> Dict[str, int]:
    """Speaker-grouped k-fold: speaker -> group 1..k, deterministic from the speaker ids alone.

    Speakers are ordered by gender then id and dealt round-robin, so each group gets both genders
    when the corpus has them and the groups differ in size by at most one speaker.

    Raises:
        DataError: fewer speakers than folds.
    """
    if k < 2:
        raise DataError(f"{corpus}: data.num_folds must be at least 2, got {k}")
    order = sorted(speakers, key=lambda s: (str(speakers[s] or ""), s))
    if len(order) < k:
        raise DataError(f"{corpus}: {len(order)} speakers cannot make {k} speaker-disjoint folds "
                        f"(set data.num_folds to at most {len(order)})")
    return {spk: i % k + 1 for i, spk in enumerate(order)}


# ---------------------------------------------------------------- files


def check_root(root: str | Path, corpus: Corpus) -> Path:
    """The root as an absolute directory, or a DataError naming the expected layout."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{corpus.title} root not found: {path} (set data.root or --root to a directory laid out as "
                        f"{corpus.layout})")
    if not path.is_dir():
        raise DataError(f"{corpus.title} root is not a directory: {path} (expected {corpus.layout})")
    return path.resolve()


def no_match(root: Path, corpus: Corpus, what: str) -> DataError:
    """The error for a root that holds none of the corpus's files: what was expected, what was found."""
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    shown = ", ".join(found[:10]) + (" ..." if len(found) > 10 else "")
    return DataError(f"{root} is not a {corpus.title} release: expected {corpus.layout}; {what} "
                     f"(found: {shown or 'nothing'}; data.corpus={corpus.name})")


def is_decoy(name: str) -> bool:
    """macOS AppleDouble companions (``._x.wav``), ``.DS_Store`` and other hidden files."""
    return name.startswith(".")


def walk_files(root: Path, suffixes: Sequence[str] = (".wav",)) -> Tuple[List[Path], Dict[str, int]]:
    """Files under ``root`` with one of ``suffixes`` (case-insensitive), sorted; ``__MACOSX`` trees and
    hidden files skipped and counted."""
    out, ignored = [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        if "__MACOSX" in dirnames:
            ignored["__MACOSX entries"] = ignored.get("__MACOSX entries", 0) + sum(
                len(f) for _, _, f in os.walk(Path(dirpath) / "__MACOSX"))
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX" and not d.startswith("."))
        for name in filenames:
            if not name.lower().endswith(tuple(suffixes)):
                continue
            if is_decoy(name):
                ignored["hidden / AppleDouble files"] = ignored.get("hidden / AppleDouble files", 0) + 1
                continue
            out.append(Path(dirpath) / name)
    return sorted(out), ignored


LFS_MAGIC = b"version https://git-lfs"


def is_lfs_pointer(path: Path) -> bool:
    """A Git LFS pointer file (a clone without LFS or a GitHub zip) instead of the audio."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError:
        return False


def duration(path: Path) -> float:
    """Seconds of audio from the file header (NaN when the header cannot be read)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return round(info.frames / info.samplerate, 4) if info.samplerate else math.nan
    except Exception:  # an unreadable header: featurization reports the file, the manifest keeps going
        return math.nan


def row(utt_id: str, group: int, speaker: str, gender: str, raw: str, label: str, path: Path, *,
        dialog: str = "", method: str = "", vad: Tuple[float, float, float] = (math.nan,) * 3,
        dur: Optional[float] = None) -> dict:
    """One manifest row (``start`` 0, ``end`` = ``duration`` from the header unless given)."""
    d = duration(path) if dur is None else dur
    return {"utt_id": utt_id, "session": int(group), "dialog": dialog, "method": method, "speaker": speaker,
            "gender": gender, "raw_label": raw, "label": label, "valence": vad[0], "activation": vad[1],
            "dominance": vad[2], "start": 0.0, "end": d, "duration": d, "path": str(path)}


def finish(rows: List[dict], report_kw: dict) -> ManifestReport:
    """The manifest frame (:data:`MANIFEST_COLUMNS`, sorted by ``utt_id``, one row per id) and its report."""
    kept = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    dup = int(kept["utt_id"].duplicated().sum())
    if dup:
        log.warning("%d duplicate utterance ids kept once", dup)
    kept = kept.drop_duplicates("utt_id").sort_values("utt_id", ignore_index=True)
    kept["session"] = kept["session"].astype("int64")
    for c in ("valence", "activation", "dominance", "start", "end", "duration"):
        kept[c] = kept[c].astype("float64")
    return ManifestReport(kept=kept, **report_kw)


def apply_labels(entries: Iterable[dict], space: LabelSpace, keep_unlabelled: bool,
                  corpus: Corpus, report_kw: dict) -> ManifestReport:
    """Apply the label space (:func:`label_space`) to parsed entries (each a :func:`row` dict plus ``where``),
    count drops and missing audio, and build the report. Unknown raw labels are an error (:func:`check_labels`)."""
    entries = list(entries)
    mapping = space.mapping
    check_labels(((e["raw_label"], e.pop("where")) for e in entries), mapping, corpus.title, space.classes)
    rows, dropped, missing = [], {}, []
    lfs = []
    for e in entries:
        cls = mapping[e["raw_label"]]
        if not cls:
            key = (e["session"], e["raw_label"])
            dropped[key] = dropped.get(key, 0) + 1
            if not keep_unlabelled:
                continue
        if not Path(e["path"]).is_file():
            missing.append(e["utt_id"])
            continue
        if is_lfs_pointer(Path(e["path"])):
            lfs.append(e["path"])
            continue
        rows.append({**e, "label": cls})
    if lfs:
        raise DataError(f"{corpus.title}: {len(lfs)} audio files are Git LFS pointers, not audio (e.g. {lfs[0]}): "
                        "the release was cloned without LFS or downloaded as a zip; run `git lfs pull` in it")
    if missing:
        log.warning("%d labelled utterances have no audio (skipped), e.g. %s", len(missing), missing[0])
    return finish(rows, {**report_kw, "dropped": dropped, "missing_wav": missing, "unlabelled_kept": keep_unlabelled,
                         "corpus": corpus.title, "group_name": corpus.group_name, "classes": space.classes,
                         "class_setting": space.setting})


# ---------------------------------------------------------------- the manifest file

#: Parquet metadata key of a manifest's class list (absent: the four classes).
CLASSES_KEY = b"serray.classes"


def write_manifest(df: pd.DataFrame, path: str | Path, classes: Sequence[str] = LABELS, setting: str = "four") -> Path:
    """Write a manifest frame to Parquet (parent directories created). A manifest of other classes than
    the four (``data.classes``) records them, in index order, in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if setting == "four" and tuple(classes) == LABELS:
        df.to_parquet(path, index=False)  # the four-class manifest: as it always was
        return path
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), CLASSES_KEY: json.dumps({"classes": list(classes), "setting": setting}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def manifest_classes(path: str | Path) -> Tuple[Tuple[str, ...], str]:
    """The classes (index order) and the ``data.classes`` setting a manifest was built with."""
    import json

    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if CLASSES_KEY not in meta:
        return LABELS, "four"
    record = json.loads(meta[CLASSES_KEY])
    return tuple(record["classes"]), str(record["setting"])


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`, checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (run `serray manifest` first)")
    df = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path} is not a serray manifest: missing columns {missing}")
    return df
