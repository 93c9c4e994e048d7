"""IEMOCAP manifest: parse an ``IEMOCAP_full_release`` tree into one row per labelled utterance.

By default only the 4-class utterances are kept; with ``keep_unlabelled`` every labelled utterance is
kept, those outside the 4-class map with ``label == ""`` (pre-training only).

Facts of the release this parser relies on (and only these):

* labels live in ``Session{n}/dialog/EmoEvaluation/<dialog>.txt``; an utterance line is
  ``[start - end]<TAB>utt_id<TAB>label<TAB>[V, A, D]``; the evaluator lines below it (``C-E1:``,
  ``A-F2:`` ...) and the ``%`` header are not utterances;
* the utterance audio is ``Session{n}/sentences/wav/<dialog>/<utt_id>.wav``;
* the speaker is the session plus the gender letter of the utterance id's *last* field
  (``Ses01F_impro02_M000`` is the male actor of session 1, although the dialog name says F);
* the release also holds macOS ``._*`` AppleDouble files, whole-dialog wavs in ``dialog/wav/`` and
  extra annotation folders (``Categorical/``, ``Attribute/`` ...) under ``EmoEvaluation/``: none of
  them are utterances, so nothing here globs ``*.wav``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from serray.data.corpora.base import MANIFEST_COLUMNS, Corpus, LabelSpace, ManifestReport, cfg_get, label_space
from serray.errors import DataError

log = logging.getLogger(__name__)

_UTT_LINE = re.compile(
    r"^\[(?P<start>\d+(?:\.\d+)?)\s*-\s*(?P<end>\d+(?:\.\d+)?)\]\t(?P<utt>\S+)\t(?P<label>\S+)\t"
    r"\[(?P<v>[-\d.]+),\s*(?P<a>[-\d.]+),\s*(?P<d>[-\d.]+)\]\s*$"
)
_UTT_ID = re.compile(r"^Ses(?P<session>0[1-5])(?P<lead>[FM])_(?P<method>impro|script)\w*_(?P<gender>[FM])\d+$")


def label_map(merge_excited: bool = True, overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Raw IEMOCAP label -> 4-class label; labels absent from the map are dropped (or kept unlabelled).
    ``overrides`` (``data.label_map``) map more raw labels, or drop one with ``""``."""
    return _kept(label_space(CORPUS, {"label_map": dict(overrides or {})}), merge_excited, overrides)


def _kept(space: LabelSpace, merge_excited: bool, overrides: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """The raw labels a space gives a class (``exc`` only when merged into happy, or mapped by an override)."""
    return {raw: cls for raw, cls in space.mapping.items()
            if cls and (merge_excited or raw != "exc" or "exc" in dict(overrides or {}))}


def check_layout(root: Path, sessions: Sequence[int]) -> None:
    """Raise a :class:`DataError` that says what is missing when ``root`` is not an IEMOCAP tree."""
    if not root.exists():
        raise DataError(f"IEMOCAP root not found: {root} (set data.root or --root to the IEMOCAP_full_release directory)")
    if not root.is_dir():
        raise DataError(f"IEMOCAP root is not a directory: {root}")
    missing = []
    for s in sessions:
        for sub in ("", "dialog/EmoEvaluation", "sentences/wav"):
            p = root / f"Session{s}" / sub
            if not p.is_dir():
                missing.append(str(p.relative_to(root)))
    if missing:
        found = sorted(p.name for p in root.iterdir())[:10]
        nested = [p for p in root.iterdir() if p.is_dir() and (p / "Session1").is_dir()]
        hint = f"; did you mean {nested[0]}?" if nested else ""
        raise DataError(
            f"{root} is not an IEMOCAP_full_release tree: missing {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} (found: {', '.join(found) or 'nothing'}){hint}"
        )


def _annotation_files(root: Path, session: int) -> List[Path]:
    folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
    # only the top-level <dialog>.txt files; sub-folders (Categorical/, Attribute/ ...) and
    # macOS AppleDouble companions (._*) are not utterance annotations.
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("._"))


def _parse_annotation(path: Path) -> Iterable[Tuple[int, Optional[re.Match], str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("["):
                yield lineno, _UTT_LINE.match(line.rstrip("\n")), line.strip()


def _line_problem(m: re.Match) -> Optional[str]:
    """What is wrong with the numbers of a matched utterance line (None: nothing)."""
    values = {}
    for key in ("start", "end", "v", "a", "d"):
        try:
            values[key] = float(m[key])
        except ValueError:
            return f"malformed number {m[key]!r}"
        if not math.isfinite(values[key]):
            return f"malformed number {m[key]!r}"
    if values["end"] <= values["start"]:
        return f"end {m['end']} is not after start {m['start']}"
    return None


def build_manifest(
    root: str | Path, sessions: Sequence[int] = (1, 2, 3, 4, 5), merge_excited: bool = True,
    keep_unlabelled: bool = False, overrides: Optional[Mapping[str, str]] = None,
    group_of: Optional[Callable[[str], int]] = None, space: Optional[LabelSpace] = None,
) -> ManifestReport:
    """Parse an IEMOCAP tree into a manifest of the 4-class utterances (or of every labelled one).

    Args:
        root: the ``IEMOCAP_full_release`` directory (it holds ``Session1`` ... ``Session5``).
        sessions: which sessions to read.
        merge_excited: map ``exc`` to ``hap`` (the standard setup); otherwise ``exc`` is outside the map.
        keep_unlabelled: keep the utterances whose raw label is outside the 4-class map too, with
            ``label == ""`` and their ``raw_label`` (for pre-training; ``pretrain.use_unlabelled``).
            They are still counted in ``dropped`` (label outside the 4-class setup).
        overrides: ``data.label_map`` entries (raw label -> class, or ``""`` to drop it).
        group_of: the fold group of a speaker (``session`` column and drop counts); None: the session.
        space: the run's classes (``data.classes``, :func:`serray.data.corpora.base.label_space`; its map replaces
            ``overrides``); None: the four classes.

    Returns:
        A :class:`ManifestReport` whose ``kept`` frame has :data:`MANIFEST_COLUMNS`, sorted by
        ``utt_id``, plus the dropped / missing-wav / malformed counts.

    Raises:
        DataError: the root is missing or is not an IEMOCAP layout.
    """
    root = Path(root).expanduser().resolve()
    check_layout(root, sessions)
    mapping = label_map(merge_excited, overrides) if space is None else _kept(space, merge_excited, overrides)
    rows, dropped, missing, malformed = [], {}, [], []
    for session in sessions:
        files = _annotation_files(root, session)
        if not files:
            raise DataError(f"{root}/Session{session}/dialog/EmoEvaluation holds no <dialog>.txt annotation files")
        for ann in files:
            dialog = ann.stem
            for lineno, m, text in _parse_annotation(ann):
                if m is None:
                    malformed.append(f"{ann}:{lineno}: {text[:80]}")
                    continue
                utt, raw = m["utt"], m["label"]
                problem = _line_problem(m)
                if problem:
                    malformed.append(f"{ann}:{lineno}: {problem}: {text[:80]}")
                    continue
                ident = _UTT_ID.match(utt)
                if ident is None or int(ident["session"]) != session:
                    malformed.append(f"{ann}:{lineno}: unexpected utterance id {utt!r}")
                    continue
                speaker = f"Ses{ident['session']}_{ident['gender']}"
                group = group_of(speaker) if group_of else session
                if raw not in mapping:
                    dropped[(group, raw)] = dropped.get((group, raw), 0) + 1
                    if not keep_unlabelled:
                        continue
                wav = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav"
                if not wav.is_file():
                    missing.append(utt)
                    continue
                start, end = float(m["start"]), float(m["end"])
                rows.append({
                    "utt_id": utt,
                    "session": group,
                    "dialog": dialog,
                    "method": ident["method"],
                    "speaker": speaker,
                    "gender": ident["gender"],
                    "raw_label": raw,
                    "label": mapping.get(raw, ""),
                    "valence": float(m["v"]),
                    "activation": float(m["a"]),
                    "dominance": float(m["d"]),
                    "start": start,
                    "end": end,
                    "duration": round(end - start, 4),
                    "path": str(wav),
                })
    if missing:
        log.warning("%d label lines have no wav (skipped), e.g. %s", len(missing), missing[0])
    if malformed:
        log.warning("%d malformed utterance lines (skipped), e.g. %s", len(malformed), malformed[0])
    kept = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    kept = kept.drop_duplicates("utt_id").sort_values("utt_id", ignore_index=True)
    kept["session"] = kept["session"].astype("int64")
    return ManifestReport(kept=kept, dropped=dropped, missing_wav=missing, malformed=malformed,
                          unlabelled_kept=keep_unlabelled, group_name="speaker" if group_of else "session",
                          **({"classes": space.classes, "class_setting": space.setting} if space else {}))


def speaker_group(speaker: str) -> int:
    """Leave-one-speaker-out fold group of an IEMOCAP speaker: ``Ses01_F`` 1, ``Ses01_M`` 2, ... ``Ses05_M`` 10."""
    return 2 * (int(speaker[3:5]) - 1) + (1 if speaker.endswith("F") else 2)


def _by_speaker(data_cfg) -> bool:
    return cfg_get(data_cfg, "protocol") == "leave_one_speaker_out"


def _build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    groups = list(cfg_get(data_cfg, "sessions") or _groups(data_cfg))
    space = label_space(CORPUS, data_cfg)
    if not _by_speaker(data_cfg):
        return build_manifest(root, groups, cfg_get(data_cfg, "merge_excited", True), keep_unlabelled,
                              cfg_get(data_cfg, "label_map"), space=space)
    # leave-one-speaker-out: the fold group is the speaker (10 folds, each testing one actor)
    report = build_manifest(root, sorted({(g + 1) // 2 for g in groups}), cfg_get(data_cfg, "merge_excited", True),
                            keep_unlabelled, cfg_get(data_cfg, "label_map"), group_of=speaker_group, space=space)
    report.kept = report.kept[report.kept["session"].isin(groups)].reset_index(drop=True)
    report.dropped = {k: n for k, n in report.dropped.items() if k[0] in groups}
    report.notes.append("leave-one-speaker-out (data.protocol): fold group k is speaker k "
                        "(Ses01_F = 1, Ses01_M = 2, ... Ses05_M = 10)")
    return report


def _groups(data_cfg) -> List[int]:
    return list(range(1, 11)) if _by_speaker(data_cfg) else [1, 2, 3, 4, 5]


FOUR_CLASS = {"neu": "neu", "hap": "hap", "exc": "hap", "sad": "sad", "ang": "ang", "fru": "", "sur": "", "fea": "", "dis": "",
              "oth": "", "xxx": ""}

#: IEMOCAP as a :class:`~serray.data.corpora.base.Corpus`: leave-one-session-out over its 5 sessions, or
#: (``data.protocol: leave_one_speaker_out``) over its 10 speakers.
CORPUS = Corpus(
    name="iemocap", title="IEMOCAP", group_name="session", protocol="leave_one_session_out",
    layout="IEMOCAP_full_release/Session{1..5}/{sentences/wav,dialog/EmoEvaluation}",
    raw_labels=FOUR_CLASS,
    native=FOUR_CLASS,  # data.classes: native is the field's four (EmoBox, SUPERB ER): excited merged into happy
    build=_build, groups=_groups, dimension_range=(1.0, 5.0), other_protocols=("leave_one_speaker_out",),
)
