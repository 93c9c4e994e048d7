"""The model registry: selected classifiers under ``registry.dir`` (what Serve loads).

An entry is a directory ``<registry.dir>/<id>/`` with

* ``model/`` — a classifier checkpoint (``state.pt`` weights-only, ``meta.json``, ``config.yaml``):
  frozen adapter branch + SAP head, its input statistics, the feature (encoder) identity and labels;
* ``entry.json`` — id (version), creation time, source (``finetune`` or ``tune``), metrics, encoder
  identity, label set, the hyper-parameters that were swept (if any), the config hash;
* ``config.yaml`` — the fully resolved run config that produced it;
* ``model/encoder/`` — for a Hugging Face encoder (``registry.include_encoder``), its config and
  weights, so that a Serve replica or ``serray predict`` on a node that never featurized (and cannot
  download) loads the encoder offline from the entry.

A leave-one-session-out run yields one model per fold; the entry holds the fold model with the best
validation UA (chosen on training-session data only), and the run's LOSO test metrics plus its mean
validation UA. Every entry records ``protocol`` (inductive / transductive), ``folds`` and
``selected_on`` (how its configuration was chosen).

``best`` never looks at test metrics: it is the entry with the highest mean *validation* UA among the
entries evaluated like the config asking (:func:`serray.train.protocol.evaluation`: the same protocol,
folds, validation split and label fraction; comparing a one-fold sweep entry with a five-fold run, or
an inductive with a transductive one, would compare different things), and never an entry of a
``non-nested`` sweep (its test sessions helped choose its configuration).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from serray import storage
from serray.errors import DataError
from serray.train.protocol import EVALUATION_KEYS, same_evaluation

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
MODEL_DIR = "model"


def encoder_files(name: str) -> Optional[Path]:
    """The local directory holding a Hugging Face encoder's files (``name`` a directory, or a hub id in
    this machine's cache); None for the built-in encoders or when the files are not on this machine."""
    from serray.data.features.encoders import BUILTIN_ENCODERS

    if name in BUILTIN_ENCODERS:
        return None
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not in the cache (featurized on other nodes): the replica needs the hub or a cache
        return None


def register(registry_dir: str | Path, model_dir: str | Path, *, metrics: Dict[str, Any], config_yaml: str,
             source: str, hyperparameters: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
             encoder_files: Optional[str | Path] = None) -> Dict[str, Any]:
    """Copy a classifier checkpoint into a new registry entry; return the entry record.

    ``registry_dir`` and ``model_dir`` may be local paths or storage URIs. An entry appears complete or
    not at all: locally it is renamed into place; on object storage ``entry.json`` is written last.
    ``encoder_files``: a local directory with the encoder's Hugging Face files, copied to
    ``model/encoder/`` (see :func:`encoder_files`).
    """
    from serray.train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(model_dir)  # validates the checkpoint
    if meta.get("kind") != "classifier":
        raise DataError(f"{model_dir} holds a '{meta.get('kind')}' checkpoint, not a classifier")
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    entry_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    record = {"id": entry_id, "created": created, "created_ns": time.time_ns(), "source": source,
              "metrics": {k: v for k, v in metrics.items()},
              "encoder": meta["features"], "labels": meta.get("labels"), "mode": meta.get("mode"),
              "hyperparameters": hyperparameters or {}, **(extra or {})}
    entry_json = json.dumps(record, indent=2)

    def fill(d: Path) -> None:
        shutil.copytree(storage.local_copy(model_dir), d / MODEL_DIR)
        if encoder_files is not None:
            from serray.train.checkpoint import ENCODER_DIR

            shutil.copytree(encoder_files, d / MODEL_DIR / ENCODER_DIR, symlinks=False,
                            ignore=shutil.ignore_patterns(".git*", "*.msgpack", "*.h5", "flax_model*", "tf_model*"))
        (d / "config.yaml").write_text(config_yaml)

    if storage.is_uri(registry_dir):
        with storage.staged(storage.join(registry_dir, entry_id)) as tmp:
            fill(tmp)
        storage.write_text(storage.join(registry_dir, entry_id, ENTRY_FILE), entry_json)  # last: now it is listed
        return record
    root = Path(registry_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = root / f".{entry_id}.tmp"
    fill(tmp)
    (tmp / ENTRY_FILE).write_text(entry_json)
    tmp.rename(root / entry_id)  # listed only once complete
    return record


#: A ``.<id>.tmp`` directory older than this is an interrupted registration, removed by the next one.
STALE_TMP_S = 3600.0


def clean_stale(root: Path) -> List[Path]:
    """Remove the temporaries of interrupted registrations (older than :data:`STALE_TMP_S`)."""
    removed = []
    now = time.time()
    for d in root.glob(".*.tmp"):
        try:
            if d.is_dir() and not d.is_symlink() and now - d.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(d)
                removed.append(d)
        except OSError:  # another process removed or renamed it meanwhile
            continue
    if removed:
        log.info("registry: removed %d stale temporar%s of interrupted registrations", len(removed),
                 "y" if len(removed) == 1 else "ies")
    return removed


def _outside(d: str, root: str | Path) -> Optional[str]:
    """Why a local entry directory (or its model) must not be followed: a symbolic link, or a path
    that resolves outside the registry directory. None for object storage and ordinary entries."""
    if storage.is_uri(d):
        return None
    p, base = Path(d), Path(root).resolve()
    for q in (p, p / MODEL_DIR):
        if q.is_symlink():
            return f"{q.name if q != p else 'the entry'} is a symbolic link to {q.resolve()}: not followed"
    if base not in p.resolve().parents:
        return f"it resolves outside the registry ({p.resolve()}): not followed"
    return None


def _entry_problem(rec: Any) -> Optional[str]:
    """Why a parsed ``entry.json`` is not a usable entry record (None: it is)."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    wrong = [k for k, t in (("id", str), ("created", str), ("metrics", dict), ("encoder", dict)) if not isinstance(rec.get(k), t)]
    if wrong:
        return f"missing or malformed field(s) {', '.join(wrong)}"
    if not isinstance(rec.get("folds", []), (list, type(None))) or not isinstance(rec.get("protocol", ""), (str, type(None))):
        return "malformed field(s) folds / protocol"
    return None


def scan_entries(registry_dir: str | Path) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """``(entries, problems)``: every complete, readable entry (oldest first), and for each directory
    whose ``entry.json`` is truncated, not JSON or not an entry record, ``(directory, reason)``."""
    entries, problems = [], []
    for d in storage.listdir(registry_dir):
        f = storage.join(d, ENTRY_FILE)
        if storage.name(d).startswith(".") or not storage.is_file(f):
            continue
        outside = _outside(d, registry_dir)
        if outside:
            problems.append((storage.describe(d), outside))
            continue
        where = d if storage.is_uri(d) else str(Path(d).resolve())
        try:
            rec = json.loads(storage.read_text(f))
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            problems.append((storage.describe(where), f"{ENTRY_FILE} is not valid JSON ({e})"))
            continue
        why = _entry_problem(rec)
        if why:
            problems.append((storage.describe(where), f"{ENTRY_FILE}: {why}"))
            continue
        rec["path"] = where
        if not isinstance(rec.get("created_ns"), int) or isinstance(rec.get("created_ns"), bool):
            rec["created_ns"] = 0
        entries.append(rec)
    entries.sort(key=lambda r: (r["created_ns"], r["created"], r["id"]))
    return entries, problems


def list_entries(registry_dir: str | Path) -> List[Dict[str, Any]]:
    """Every complete, readable entry, oldest first (unreadable ones are logged and skipped; see
    :func:`scan_entries`)."""
    entries, problems = scan_entries(registry_dir)
    for where, why in problems:
        log.warning("skipping registry entry %s: %s", where, why)
    return entries


def _metric(entry: Dict[str, Any], metric: str) -> float:
    v = entry["metrics"].get(metric)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("-inf")
    return v if math.isfinite(v) else float("-inf")


BEST_METRIC = "val_ua"


def entry_evaluation(entry: Dict[str, Any]) -> Dict[str, Any]:
    """An entry's evaluation record (:data:`serray.train.protocol.EVALUATION_KEYS`). Entries registered before
    a key was recorded get it from their saved ``config.yaml`` (``selection``: ``fixed`` unless the
    entry came from a sweep)."""
    out = {k: entry.get(k) for k in EVALUATION_KEYS}
    missing = [k for k in ("val_split", "val_fraction", "label_fraction") if out[k] is None]
    if missing:
        import yaml

        try:
            saved = yaml.safe_load(storage.read_text(storage.join(entry["path"], "config.yaml"))) or {}
        except Exception:  # unreadable or absent: those keys stay unknown (not comparable)
            saved = {}
        finetune = saved.get("finetune") if isinstance(saved, dict) else None
        for k in missing:
            if isinstance(finetune, dict) and finetune.get(k) is not None:
                out[k] = finetune[k]
    if out["selection"] is None:
        out["selection"] = "non-nested" if entry.get("source") == "tune" else "fixed"
    return out


def comparable(entry: Dict[str, Any], wanted: Optional[Dict[str, Any]]) -> bool:
    """Whether an entry was evaluated as ``wanted`` asks (None: any)."""
    return wanted is None or same_evaluation(entry_evaluation(entry), wanted)


def _describe_wanted(wanted: Optional[Dict[str, Any]]) -> str:
    if not wanted:
        return "any evaluation"
    return ", ".join(f"{k}={v}" for k, v in wanted.items() if v is not None)


def best_entry(registry_dir: str | Path, wanted: Optional[Dict[str, Any]] = None,
               metric: str = BEST_METRIC) -> Dict[str, Any]:
    """The entry with the highest mean validation UA among those evaluated as ``wanted`` asks
    (:func:`serray.train.protocol.evaluation` of the asking config, usually without ``selection``; ties: the
    newest) whose model loads. Test metrics are never used to choose; ``non-nested`` sweep entries are
    never chosen (give their id)."""
    entries = list_entries(registry_dir)
    if not entries:
        raise DataError(f"the model registry {storage.describe(registry_dir)} is empty: run `serray finetune` or `serray tune` first")
    same = [e for e in entries if comparable(e, wanted)]
    leaky = [e for e in same if entry_evaluation(e)["selection"] == "non-nested"]
    if leaky:
        log.info("not ranking %d non-nested sweep entr%s (%s): their test sessions helped choose them",
                 len(leaky), "y" if len(leaky) == 1 else "ies", ", ".join(e["id"] for e in leaky))
    same = [e for e in same if e not in leaky]
    if not same:
        raise DataError(f"no registry entry in {storage.describe(registry_dir)} was evaluated with "
                        f"{_describe_wanted(wanted)} (entries: "
                        + ", ".join(f"{e['id']} ({_describe_wanted(entry_evaluation(e))})" for e in entries)
                        + "); give serve.model=<id> to choose one")
    ranked = sorted(same, key=lambda r: (_metric(r, metric), r["created_ns"], r["id"]), reverse=True)
    skipped = []
    for e in ranked:  # the best one that really loads
        why = loadable(e)
        if why is None:
            return {**e, "chosen_as": best_label(e, len(same), metric)}
        skipped.append(f"{e['id']} ({why})")
        log.warning("skipping registry entry %s: %s", e["id"], why)
    raise DataError(f"no comparable registry entry in {storage.describe(registry_dir)} loads: " + "; ".join(skipped))


def best_label(entry: Dict[str, Any], among: int, metric: str = BEST_METRIC) -> str:
    """How the registry's best was chosen, in words (``serray models show``, ``GET /info``)."""
    ev = entry_evaluation(entry)
    how = ("epoch counts by inner cross-validation over each fold's training groups" if ev.get("epoch_selection") == "inner_cv"
           else f"epochs chosen on held-out training {ev.get('val_split')}s ({ev.get('val_fraction')})")
    return (f"best of {among} comparable entr{'y' if among == 1 else 'ies'} by mean {metric} ({how}; "
            f"{ev.get('selection')} configuration); test metrics were not used")


def loadable(entry: Dict[str, Any]) -> Optional[str]:
    """Why an entry's model cannot be served (None: it loads): its weights, ``meta.json`` and model
    arguments, and the encoder files it carries. One line, for warnings and errors."""
    from serray.errors import SerrayError
    from serray.train.scoring import Scorer

    source = model_source(entry)
    if not storage.is_file(storage.join(source, "meta.json")):
        return f"it has no {MODEL_DIR}/meta.json"
    try:
        local = model_dir(entry)
        predictor = Scorer.from_checkpoint(local)
    except SerrayError as e:
        return str(e).splitlines()[0]
    encoder = Path(local) / "encoder"
    from serray.data.features.encoders import BUILTIN_ENCODERS

    if predictor.features.get("encoder") not in (None, *BUILTIN_ENCODERS) and encoder.is_dir():
        try:
            json.loads((encoder / "config.json").read_text())
        except (OSError, ValueError) as e:
            return f"its encoder files are unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def get_entry(registry_dir: str | Path, entry_id: Optional[str] = None,
              wanted: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One entry by id (a unique prefix is enough), or the best comparable one when ``entry_id`` is None."""
    if entry_id is None or entry_id == "best":
        return best_entry(registry_dir, wanted)
    entries, problems = scan_entries(registry_dir)
    hits = [e for e in entries if e["id"] == entry_id] or [e for e in entries if e["id"].startswith(entry_id)]
    broken = [(w, why) for w, why in problems if storage.name(w) == entry_id]
    if not hits and broken:
        raise DataError(f"registry entry '{entry_id}' is unreadable: {broken[0][1]}")
    if len(hits) != 1:
        known = ", ".join(e["id"] for e in entries) or "none"
        what = "is ambiguous" if hits else "does not exist"
        raise DataError(f"registry entry '{entry_id}' {what} in {storage.describe(registry_dir)} (entries: {known})")
    return hits[0]


def model_source(entry: Dict[str, Any]) -> str:
    """Where the classifier checkpoint of an entry lives (a local path or a storage URI)."""
    if entry.get("source") == "checkpoint":
        return entry["path"]
    return storage.join(entry["path"], MODEL_DIR)


def model_dir(entry: Dict[str, Any]) -> Path:
    """The classifier checkpoint directory of an entry, local (an entry on object storage is
    downloaded into the local cache, see :func:`serray.storage.local_copy`)."""
    return storage.local_copy(storage.join(entry["path"], MODEL_DIR), refresh=False)  # entries never change


def resolve_model(cfg) -> tuple[Path, Dict[str, Any]]:
    """What ``serray serve`` / ``serray predict`` load: ``serve.checkpoint`` or the registry entry
    ``serve.model`` (default: the best). Returns (checkpoint dir, entry record or a minimal card)."""
    if cfg.serve.checkpoint:
        given = str(cfg.serve.checkpoint)
        if not storage.is_file(storage.join(given, "meta.json")):
            raise DataError(f"serve.checkpoint={storage.describe(given)} is not a classifier checkpoint directory (no meta.json)")
        path = storage.local_copy(given)
        return path, {"id": storage.name(given), "source": "checkpoint", "path": given if storage.is_uri(given)
                      else str(path.resolve()), "metrics": {}}
    entry = get_entry(cfg.registry.dir, cfg.serve.model, wanted_evaluation(cfg))
    return model_dir(entry), entry


def wanted_evaluation(cfg) -> Dict[str, Any]:
    """What the registry's "best" must have been evaluated like, for a config: its protocol, folds,
    validation split and label fraction (any selection but ``non-nested``)."""
    from serray.train.protocol import evaluation

    return {**evaluation(cfg), "selection": None}


def format_entries(entries: List[Dict[str, Any]], problems: Optional[List[Tuple[str, str]]] = None) -> str:
    """A table for ``serray models list`` (plus one line per unreadable entry, which is skipped)."""
    bad = [f"unreadable entry {where} (skipped): {why}" for where, why in problems or []]
    if not entries:
        return "\n".join(["(no registered models)", *bad])
    lines = [f"{'id':<24} {'created':<20} {'source':<9} {'protocol':<12} {'folds':<11} {'val split':<14} {'labels':>6} "
             f"{'selection':<10} {'valUA%':>6} {'UA %':>6} {'WA %':>6} {'F1 %':>6}  {'encoder':<14} selected_on"]
    for e in entries:
        m = e["metrics"]
        pct = lambda k: f"{100 * m[k]:6.2f}" if isinstance(m.get(k), (int, float)) else f"{'-':>6}"  # noqa: E731
        ev = entry_evaluation(e)
        folds = ",".join(str(f) for f in ev["folds"] or []) or "-"
        split = f"{ev['val_split']} {ev['val_fraction']:g}" if ev["val_split"] and ev["val_fraction"] is not None else "-"
        split = "inner_cv" if ev.get("epoch_selection") == "inner_cv" else split
        labels = f"{ev['label_fraction']:g}" if ev["label_fraction"] is not None else "-"
        lines.append(f"{e['id']:<24} {e['created']:<20} {str(e.get('source')):<9} {str(ev['protocol'] or '-'):<12} "
                     f"{folds:<11} {split:<14} {labels:>6} {ev['selection']:<10} {pct('val_ua')} {pct('ua')} {pct('wa')} "
                     f"{pct('macro_f1')}  {storage.public_name(e['encoder'].get('encoder')):<14} {e.get('selected_on') or '-'}")
    lines.append("(best = highest valUA among entries evaluated alike: protocol, folds, validation split or inner_cv, label "
                 "fraction; non-nested sweep entries are never best; UA/WA/F1 are LOSO test metrics)")
    return "\n".join(lines + bad)
