"""MSP-Podcast (1.11 / 1.12, and the older spellings): ``Audios/*.wav`` + ``Labels/labels_consensus.csv``.

Facts of the release this parser relies on (release readme; the lab's challenge code):

* ``Labels/labels_consensus.csv`` (or ``.json``; releases before 1.9 spell it ``labels_concensus``)
  holds one row per turn: ``FileName`` (with ``.wav``), ``EmoClass`` (A angry, H happy, S sad,
  N neutral, U surprise, F fear, D disgust, C contempt, O other, X no agreement), ``EmoAct``,
  ``EmoVal``, ``EmoDom`` (rater means on a 1-7 scale, stored as they are), ``SpkrID``, ``Gender`` and
  ``Split_Set`` (Train, Development, Test1, Test2, Test3; older releases say Validation);
* ``SpkrID`` / ``Gender`` may be ``Unknown``: the speaker is then ``unknown-<split>`` (one bucket per
  split, so the disjointness audit still holds), the gender ``""``. The speaker never comes from the
  file name;
* Test3's labels are withheld (scored by the lab only): its rows are counted and ignored.

Protocol: the official split, no k-fold. Fold groups: 1 = Test1 (tested), 2 = Development (the
validation set: ``finetune.val_split: group`` with ``finetune.val_groups: [2]``, see
``configs/msp-podcast.yaml``), 3 = Train, 4 = Test2 (listed in ``data.sessions`` only when wanted;
``finetune.folds=[4]`` tests it). Test1 and Test2 are test-only groups: whichever a fold tests, neither
is trained, validated or pre-trained on. At 100,000+ turns the parser reads one directory listing and each
file's header (see ``bench/manifest_scale.py``).
"""

from __future__ import annotations

import json
import math
import os

import pandas as pd

from serray.data.corpora.base import (Corpus, ManifestReport, cfg_get, check_root, label_space, apply_labels, no_match, row)
from serray.errors import DataError

SPLITS = {"Test1": 1, "Development": 2, "Validation": 2, "Train": 3, "Test2": 4}
CANONICAL = {"Validation": "Development"}  # the older releases' name
WITHHELD = ("Test3",)
CLASSES = {"A": "ang", "H": "hap", "S": "sad", "N": "neu", "U": "", "F": "", "D": "", "C": "", "O": "", "X": "",
           "": ""}  # a blank EmoClass: a turn without a consensus class (kept unlabelled, pre-training only)
#: data.classes: native -- the eight primary emotions of the MSP-Podcast challenge (Other and no agreement dropped)
NATIVE = {"A": "ang", "H": "hap", "S": "sad", "N": "neu", "U": "sur", "F": "fea", "D": "dis", "C": "con", "O": "", "X": "",
          "": ""}
COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
LABEL_FILES = ("labels_consensus.csv", "labels_consensus.json", "labels_concensus.csv", "labels_concensus.json")


def _labels(root) -> tuple:
    folder = root / "Labels"
    for name in LABEL_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise no_match(root, CORPUS, f"no Labels/{' or Labels/'.join(LABEL_FILES[:2])}")
    try:
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            df = pd.DataFrame([{"FileName": k, **v} for k, v in data.items()])
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, AttributeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (has {list(df.columns)[:12]})")
    return path, df.astype({c: str for c in ("FileName", "EmoClass", "SpkrID", "Gender", "Split_Set")})


def _float(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    root = check_root(root, CORPUS)
    audio = root / "Audios"
    if not audio.is_dir():
        raise no_match(root, CORPUS, "no Audios/ directory")
    path, df = _labels(root)
    present = {n for n in os.listdir(audio) if not n.startswith(".")}
    entries, malformed, ignored = [], [], {}
    for i, r in enumerate(df.itertuples(index=False), start=2):
        split = r.Split_Set.strip()
        if split in WITHHELD:
            ignored[f"{split} turns (labels withheld)"] = ignored.get(f"{split} turns (labels withheld)", 0) + 1
            continue
        if split not in SPLITS:
            malformed.append(f"{path.name}:{i}: unknown Split_Set {split!r}")
            continue
        name = r.FileName.strip()
        name = name if name.endswith(".wav") else name + ".wav"
        spk = r.SpkrID.strip()
        speaker = f"unknown-{CANONICAL.get(split, split)}" if spk in ("", "Unknown", "nan") else f"spk{spk}"
        wav = audio / name
        vad = (_float(r.EmoVal), _float(r.EmoAct), _float(r.EmoDom))
        dur = None if name in present else math.nan
        entries.append({**row(name[:-4], SPLITS[split], speaker, {"Male": "M", "Female": "F"}.get(r.Gender.strip(), ""),
                              r.EmoClass.strip(), "", wav, method=CANONICAL.get(split, split), vad=vad, dur=dur),
                        "where": f"{path.name}:{i}"})
    if not entries:
        raise no_match(root, CORPUS, f"{path} lists no turns of {sorted(SPLITS)}")
    return apply_labels(entries, label_space(CORPUS, data_cfg), keep_unlabelled, CORPUS,
                        {"malformed": malformed, "ignored": ignored})


CORPUS = Corpus(
    name="msp-podcast", title="MSP-Podcast", group_name="split", protocol="official_split",
    layout="Audios/*.wav + Labels/labels_consensus.csv (FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, "
           "Gender, Split_Set)",
    raw_labels=CLASSES, native=NATIVE, build=build, groups=lambda data_cfg: [1, 2, 3], test_groups=lambda data_cfg: [1],
    extra_groups=(4,), dimension_range=(1.0, 7.0), test_only_groups=(1, 4),
)
