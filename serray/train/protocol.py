"""What a reported number was measured under, derived from the config alone.

Two leave-one-session-out results are comparable only when they were evaluated alike: the same
protocol (inductive / transductive), the same folds, the same validation split (which speakers chose
the epochs), the same label fraction, and hyper-parameters chosen the same way (``selection``). The
registry ranks entries only against entries with the same :func:`evaluation`, and never ranks a
``non-nested`` sweep result (whose test sessions helped choose its hyper-parameters) at all.

Plain functions of the config: imported by the training stages and the registry alike (it imports
neither).
"""

from __future__ import annotations

from typing import Any, Dict

#: How a registered configuration was chosen: ``fixed`` (the config as given, epochs chosen on
#: validation), ``nested`` (a sweep that chose per outer fold on that fold's validation speakers),
#: ``non-nested`` (a sweep ranked on folds whose validation speakers include other folds' test sessions).
SELECTIONS = ("fixed", "nested", "non-nested")

#: The keys of an evaluation record (and of every registry entry).
EVALUATION_KEYS = ("corpus", "protocol", "folds", "val_split", "val_fraction", "label_fraction", "selection",
                   "epoch_selection", "classes")

#: Entries registered before corpora were pluggable were all IEMOCAP (or its layout), and before
#: ``finetune.epoch_selection`` all chose their epochs on a validation part, and before ``data.classes`` all
#: predicted the four classes.
LEGACY = {"corpus": "iemocap", "epoch_selection": "val", "classes": "four"}


def protocol(cfg) -> str:
    """``inductive`` (per-fold pre-training: no fold's model sees its test session) or
    ``transductive`` (one adapter for every fold, pre-trained on ``pretrain.sessions``)."""
    return "inductive" if cfg.pretrain.per_fold else "transductive"


def corpus_protocol(cfg) -> Dict[str, Any]:
    """The corpus and its evaluation protocol in words (``metrics.json``'s ``corpus`` / ``evaluation`` /
    ``group_name``), e.g. ``{"corpus": "crema-d", "evaluation": "speaker-grouped 5-fold", ...}``."""
    from serray.data import corpora

    corpus = corpora.of(cfg)
    out = {"corpus": corpus.name, "evaluation": corpus.evaluation_name(cfg.data), "group_name": corpus.group_name_of(cfg.data)}
    if corpus.name == "pooled":
        from serray.data.corpora.pooled import group_labels, members

        out["corpora"] = [{"key": m["key"], "corpus": m["corpus"]} for m in members(cfg.data)]
        out["group_labels"] = {str(g): k for g, k in group_labels(cfg.data).items()}
    return out


def grouping_keys(cfg) -> list:
    """Config keys beyond a stage's own that change which utterances form a fold: ``data.protocol`` when
    it is set, ``data.corpora`` when a run pools corpora (left out when unset, so the hashes of runs that
    never set them stay as they were)."""
    return (["data.protocol"] if cfg.data.get("protocol") else []) + (["data.corpora"] if cfg.data.get("corpora") else [])


def class_keys(cfg) -> list:
    """Config keys that change a run's classes: ``data.classes`` when it is not the four and ``data.label_map``
    when it maps anything (left out otherwise, so the hashes of four-class runs stay as they were)."""
    classes = cfg.data.get("classes", "four")
    return ((["data.classes"] if classes not in (None, "", "four") else [])
            + (["data.label_map"] if cfg.data.get("label_map") else []))


def evaluation(cfg, selection: str = "fixed") -> Dict[str, Any]:
    """The evaluation record of a run with this config (see :data:`EVALUATION_KEYS`)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return {"corpus": str(getattr(cfg.data, "corpus", "iemocap")), "protocol": protocol(cfg),
            "folds": [int(f) for f in cfg.finetune.folds],
            "val_split": str(cfg.finetune.val_split), "val_fraction": float(cfg.finetune.val_fraction),
            "label_fraction": float(cfg.finetune.label_fraction), "selection": selection,
            "epoch_selection": str(cfg.finetune.get("epoch_selection", "val") or "val"),
            "classes": class_record(cfg)}


def class_record(cfg):
    """``data.classes`` as an evaluation record holds it: ``four``, ``native`` or the list (runs over other
    class sets are not compared: UA over six classes is not UA over four)."""
    from serray.data.corpora.base import class_setting

    setting = class_setting(cfg.data)
    return setting if isinstance(setting, str) else list(setting)


def same_evaluation(entry: Dict[str, Any], wanted: Dict[str, Any]) -> bool:
    """Whether a registry entry was evaluated as ``wanted`` asks (keys ``wanted`` leaves out, or sets
    to None, are not compared). An entry that does not record a key is not comparable on it."""
    for key, value in wanted.items():
        if value is None:
            continue
        have = entry.get(key)
        have = LEGACY.get(key) if have is None else have
        if key == "folds":
            have, value = list(have or []), list(value)
        elif key in ("val_fraction", "label_fraction") and have is not None:
            have, value = float(have), float(value)
        if have != value:
            return False
    return True
