"""Several labelled corpora in one run: ``data.corpus: pooled`` with ``data.corpora: [{corpus, root,
label_map}, ...]``.

Each member is read by its own parser (:mod:`serray.data.corpora`) and its rows are renamed so that
nothing of two corpora can collide: ``utt_id`` ``<key>__<id>``, ``speaker`` and ``dialog`` ``<key>:<...>``
(``key`` is the corpus name, numbered when a corpus is listed twice). The label space is shared and
declared by ``data.classes``:

* ``four`` (default): every member mapped onto the four classes (its own map and ``label_map``);
* ``native``: the classes **every** member has (the intersection of their own sets); refused when fewer
  than two remain;
* a list: those classes, each reached by at least one member (a member lacking one is named in a note).

Two protocols (``data.protocol``):

* ``speaker_kfold`` (the default, *pooled*): speaker-grouped k-fold over the speakers of every member
  (``data.num_folds``), so each fold tests speakers of several corpora;
* ``leave_one_corpus_out``: fold group k is member k: train and validate on the others, test on it
  (one row per corpus in the table).

A member with official test sets (MSP-Podcast) is refused: its Test sets are not speaker groups a pooled
protocol may train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import pandas as pd

from serray.data.corpora.base import (LABELS, Corpus, ManifestReport, cfg_get, class_setting, finish, kfold_groups,
                                speaker_folds)
from serray.errors import ConfigError, DataError

def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def members(data_cfg) -> List[Dict[str, Any]]:
    """``data.corpora`` as ``[{key, corpus, root, label_map}]`` (root: the built-in corpus's directory under
    ``data.root`` when not given).

    Raises:
        ConfigError: fewer than two members, an unknown or unpoolable corpus, a member listed twice.
    """
    from serray.data import corpora

    items = _plain(cfg_get(data_cfg, "corpora")) or []
    if len(items) < 2:
        raise ConfigError("data.corpus=pooled needs at least two corpora in data.corpora, e.g. "
                          "data.corpora=[{corpus: crema-d}, {corpus: emodb}]")
    out, seen = [], {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"corpus": item}
        if not isinstance(item, dict) or "corpus" not in item:
            raise ConfigError(f"data.corpora[{i}]: a mapping {{corpus, root, label_map}}, got {item!r}")
        unknown = sorted(set(item) - {"corpus", "root", "label_map"})
        if unknown:
            raise ConfigError(f"data.corpora[{i}]: unknown keys {unknown} (a member has corpus, root, label_map)")
        name = str(item["corpus"])
        if name == "pooled":
            raise ConfigError(f"data.corpora[{i}]: a pooled run's members are corpora, not another pool")
        corpus = corpora.get(name)
        if corpus.test_only_groups:
            raise ConfigError(f"data.corpora[{i}]: {corpus.title} has official test sets, which a pooled protocol "
                              "would train on; run it alone (or list its parts as a csv)")
        seen[name] = seen.get(name, 0) + 1
        root = item.get("root") or str(Path(str(cfg_get(data_cfg, "root"))) / f"{name}-{i + 1}" / corpora.RELEASE_DIRS[name])
        out.append({"corpus": name, "root": str(root), "label_map": dict(item.get("label_map") or {}), "index": i + 1})
    for m in out:
        m["key"] = m["corpus"] if seen[m["corpus"]] == 1 else f"{m['corpus']}{m['index']}"
    roots = [str(Path(m["root"]).expanduser().resolve()) for m in out]
    if len(set(roots)) != len(roots):
        raise ConfigError("data.corpora lists the same root twice")
    return out


def member_config(data_cfg, member: Dict[str, Any], classes: Any) -> Dict[str, Any]:
    """The data section a member's parser reads: the run's, with the member's corpus, root and label map."""
    keys = ("merge_excited", "num_folds")
    return {**{k: cfg_get(data_cfg, k) for k in keys}, "corpus": member["corpus"], "root": member["root"],
            "label_map": member["label_map"], "classes": classes, "sessions": None, "protocol": None}


def _by_corpus(data_cfg) -> bool:
    return cfg_get(data_cfg, "protocol") == "leave_one_corpus_out"


def build(root, data_cfg, keep_unlabelled: bool = False) -> ManifestReport:
    from serray.data import corpora

    setting = class_setting(data_cfg)
    listed = setting if isinstance(setting, tuple) else None
    parts: List[Tuple[Dict[str, Any], ManifestReport]] = []
    for m in members(data_cfg):
        corpus = corpora.get(m["corpus"])
        sub = member_config(data_cfg, m, "four" if setting == "four" else "native")
        sub["sessions"] = corpus.groups(sub)
        parts.append((m, corpus.build(m["root"], sub, keep_unlabelled=True)))
    notes = []
    if setting == "four":
        classes = LABELS
    elif listed is None:
        shared = set.intersection(*(set(r.classes) for _, r in parts))
        classes = tuple(c for c in parts[0][1].classes if c in shared)
        left = sorted(set().union(*(set(r.classes) for _, r in parts)) - shared)
        if len(classes) < 2:
            raise DataError(f"the pooled corpora share {len(classes)} class(es) ({list(classes)}): "
                            + "; ".join(f"{m['key']}: {list(r.classes)}" for m, r in parts)
                            + ". List the classes to keep (data.classes=[...]) or use data.classes=four")
        if left:
            notes.append(f"classes not every corpus has, dropped: {left} (data.classes=native keeps the shared ones)")
    else:
        classes = listed
        reached = set().union(*(set(r.classes) for _, r in parts))
        missing = [c for c in classes if c not in reached]
        if missing:
            raise DataError(f"data.classes lists {missing}, which none of the pooled corpora has ("
                            + "; ".join(f"{m['key']}: {list(r.classes)}" for m, r in parts) + ")")
        for m, r in parts:
            lacking = [c for c in classes if c not in r.classes]
            if lacking:
                notes.append(f"{m['key']} has no {lacking}")
    frames, dropped = [], {}
    for m, r in parts:
        df = r.kept.copy()
        df["label"] = df["label"].where(df["label"].isin(classes), "")
        df["utt_id"] = m["key"] + "__" + df["utt_id"].astype(str)
        df["speaker"] = m["key"] + ":" + df["speaker"].astype(str)
        df["dialog"] = m["key"] + ":" + df["dialog"].astype(str)
        df["member"] = m["index"]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if _by_corpus(data_cfg):
        df["session"] = df["member"]
    else:
        genders = df.drop_duplicates("speaker").set_index("speaker")["gender"].to_dict()
        folds = speaker_folds(genders, len(kfold_groups(data_cfg)), CORPUS.title)
        df["session"] = df["speaker"].map(folds)
    for (g, raw), n in df[df["label"] == ""].groupby(["session", "raw_label"]).size().items():
        dropped[(int(g), str(raw))] = int(n)
    if not keep_unlabelled:
        df = df[df["label"] != ""]
    rows = df.drop(columns="member").to_dict("records")
    notes.insert(0, "pooled: " + ", ".join(f"{m['key']} ({len(r.kept)} rows, {m['root']})" for m, r in parts)
                 + ("; fold group k is corpus k" if _by_corpus(data_cfg) else ""))
    report = finish(rows, {"dropped": dropped, "unlabelled_kept": keep_unlabelled, "corpus": CORPUS.title,
                           "group_name": CORPUS.group_name_of(data_cfg), "classes": tuple(classes),
                           "class_setting": setting if isinstance(setting, str) else "list", "notes": notes})
    return report


def group_labels(data_cfg) -> Dict[int, str]:
    """Fold group -> the member corpus it is (leave-one-corpus-out), for tables."""
    return {m["index"]: m["key"] for m in members(data_cfg)} if _by_corpus(data_cfg) else {}


def _groups(data_cfg) -> List[int]:
    if _by_corpus(data_cfg):
        return list(range(1, len(members(data_cfg)) + 1))
    return kfold_groups(data_cfg)


CORPUS = Corpus(
    name="pooled", title="pooled corpora", group_name="fold", protocol="speaker_kfold",
    layout="data.corpora: a list of {corpus, root, label_map} (two or more corpora)",
    raw_labels={}, native={}, build=build, groups=_groups, other_protocols=("leave_one_corpus_out",),
)
