"""``serray reproduce RUN_DIR [--out DIR]``: make a run again from the provenance record of its
``metrics.json`` and compare the metrics, fold by fold.

The recorded config is the run's resolved config; every path in it under the run's ``output_dir``
is moved under ``--out`` (default ``RUN_DIR-reproduced``), so the new run writes nothing into the old
one and a synthetic corpus under ``output_dir`` is made again from its seed; paths outside (a real
corpus) are read where they were. The new run is ``serray pipeline`` with that config, tracked in its
own MLflow store (``tracking.uri`` null: ``--out/mlflow.db``), never the recorded run's.

A record is material to judge, not to obey: a recorded config that reads the environment
(``${oc.env:...}``) is refused unless ``--allow-env``, and one whose outputs (:data:`WRITTEN`) lie
outside ``--out`` is refused unless ``--allow-outside`` (a ``key=value`` given on the command line is
the user's own choice and not checked). Before the run, what differs between the record and this
checkout and environment (commit, dirty flag, package versions, python) is printed on stderr;
``--strict`` refuses to run then.

On the same machine and packages a run is deterministic per seed, so the metrics must agree exactly;
differences beyond ``--tolerance`` exit with status 1, a table showing each fold. The metrics compared
are the task's own (:func:`compared_metrics`): UA / WA / macro-F1 / validation UA for
``finetune.task=categorical``, CCC per dimension, its mean and the validation CCC mean for
``dimensional``, both for ``multitask``. What the runs were made from (commit, dirty flag, package
versions, manifest and feature hashes) is compared too and every difference printed: that is where to
look when the numbers differ.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from serray.errors import ConfigError, DataError, SerrayError
from serray.provenance import REQUIRED, missing_fields

#: Outputs a reproduction must not share with the recorded run (it would reuse them instead of training).
RUN_OUTPUTS = ("pretrain.dir", "finetune.dir", "registry.dir")
#: What a run writes: each must lie under ``--out`` (unless ``--allow-outside`` or set on the command line).
#: ``data.root`` is read (a synthetic corpus is only ever made under ``output_dir/synthetic``).
WRITTEN = ("output_dir", "data.manifest", "features.dir", "pretrain.dir", "finetune.dir", "tune.dir", "registry.dir",
           "export.dir", "ablate.pretrain_dir", "tracking.uri")
#: The metrics compared for ``finetune.task=categorical`` (and with the CCC ones for multitask), per fold
#: and for the mean.
COMPARED = ("ua", "wa", "macro_f1", "val_ua")
#: The dimensions of a dimensional record that does not name its own.
DEFAULT_DIMENSIONS = ("valence", "arousal", "dominance")
#: An interpolation that reads the environment (``${oc.env:X}``, the old ``${env:X}``), nested or not.
ENV_INTERPOLATION = re.compile(r"\$\{\s*(?:oc\.env|env)\s*:")


def find_metrics(run_dir: str | Path) -> Path:
    """The ``metrics.json`` of a run: ``RUN_DIR/metrics.json`` or ``RUN_DIR/finetune/metrics.json``."""
    run = Path(run_dir)
    for p in (run / "metrics.json", run / "finetune" / "metrics.json"):
        if p.is_file():
            return p
    what = "does not exist" if not run.exists() else "holds no metrics.json (nor finetune/metrics.json)"
    raise DataError(f"{run} {what}: give the output_dir of a finished `serray pipeline` / `serray finetune` run")


def read_record(metrics_path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(metrics, provenance)``; a :class:`DataError` saying what is missing when it cannot be reproduced."""
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{metrics_path} is unreadable ({type(e).__name__}: {e})") from None
    if isinstance(metrics, dict) and "target" in metrics and "model" in metrics:
        raise DataError(f"{metrics_path} comes from `serray evaluate` (registry entry {metrics['model']} scored on "
                        f"another corpus): reproduce re-runs `serray pipeline` / `serray finetune` runs; run the "
                        "evaluation again with the config.yaml beside it")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("folds"), list):
        raise DataError(f"{metrics_path} is not a serray metrics.json (no per-fold results)")
    prov = metrics.get("provenance")
    if prov is None:
        raise DataError(f"{metrics_path} holds no provenance record (the run was made before serray recorded one): "
                        f"it lacks {', '.join(REQUIRED)}; run it again with this version of serray to record one")
    missing = missing_fields(prov)
    if missing:
        raise DataError(f"{metrics_path}: its provenance record lacks {', '.join(missing)}, so the run cannot be "
                        "made again from it")
    if metrics.get("selection") not in (None, "fixed"):
        raise DataError(f"{metrics_path} comes from a sweep (`serray tune`, selection={metrics['selection']}): "
                        "reproduce re-runs `serray pipeline` / `serray finetune` runs; run the sweep again with its "
                        "config.yaml instead")
    return metrics, prov


def moved(config: Any, old: str, new: str) -> Any:
    """A copy of a config (a nested dict) with every path under ``old`` moved under ``new``."""
    if isinstance(config, dict):
        return {k: moved(v, old, new) for k, v in config.items()}
    if isinstance(config, list):
        return [moved(v, old, new) for v in config]
    if isinstance(config, str) and (config == old or config.startswith(old.rstrip("/") + "/")):
        return new + config[len(old.rstrip("/")):]
    return config


def env_reads(config: Any, prefix: str = "") -> List[str]:
    """The keys of a config (a nested dict) whose values read the environment (:data:`ENV_INTERPOLATION`)."""
    if isinstance(config, dict):
        return [k for key, v in config.items() for k in env_reads(v, f"{prefix}{key}.")]
    if isinstance(config, list):
        return [k for i, v in enumerate(config) for k in env_reads(v, f"{prefix[:-1]}[{i}].")]
    return [prefix[:-1]] if isinstance(config, str) and ENV_INTERPOLATION.search(config) else []


def _inside(value: str, out: Path) -> bool:
    if value.startswith("sqlite:///"):
        value = value[len("sqlite:///"):]
    if "://" in value:  # a storage URI or a tracking server: not under a local --out
        return False
    p = Path(os.path.expanduser(value)).resolve()
    return p == out or out in p.parents


def _keys(overrides: Sequence[str]) -> set:
    """The keys a ``key=value`` command line sets."""
    return {o.split("=", 1)[0].strip().lstrip("+~") for o in overrides}


def outside_outputs(cfg, out: Path, overrides: Sequence[str] = ()) -> List[str]:
    """``key=value`` of the :data:`WRITTEN` outputs of a loaded config that lie outside ``out``, but for
    the keys set in ``overrides`` (the user's own choice)."""
    mine = _keys(overrides)
    found = []
    for key in WRITTEN:
        value = OmegaConf.select(cfg, key)
        if key in mine or value is None or str(value) == "":
            continue
        if not _inside(str(value), out):
            found.append(f"{key}={value}")
    return found


def _checked_config(prov: Dict[str, Any], out: Path, overrides=(), allow_env: bool = False,
                    allow_outside: bool = False):
    """``(cfg, config)``: the loaded config and the recorded one moved to ``out`` (a dict); every refusal
    raised before anything is written."""
    import yaml

    from serray.config import load_config

    config = dict(prov["config"])
    old = str(config.get("output_dir") or "")
    if not old:
        raise DataError("the provenance record's config has no output_dir")
    if not allow_env:
        reads = [k for k in env_reads(config) if k not in _keys(overrides)]
        if reads:
            raise ConfigError(f"the recorded config reads the environment ({', '.join(reads)}: "
                              f"{', '.join(repr(str(_select(config, k))) for k in reads if '[' not in k)}), so what "
                              "this run would read or write depends on this shell, not on the record: a record saves "
                              "its config resolved, so this one was edited or made elsewhere. Give --allow-env to "
                              "resolve it here, or give those keys on the command line (key=value)")
    config = moved(config, old, str(out.resolve()))
    if isinstance(config.get("tracking"), dict):  # the recorded store (absolute) is the old run's: a store of its own
        config["tracking"] = {**config["tracking"], "uri": None}
    out = out.resolve()
    with tempfile.TemporaryDirectory(prefix="serray-reproduce-") as tmp:
        path = Path(tmp) / "reproduce.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cfg = load_config(path, list(overrides))
    if not allow_outside:
        outside = outside_outputs(cfg, out, overrides)
        if outside:
            raise ConfigError(f"the recorded config writes outside --out {out}: {'; '.join(outside)}. A reproduction "
                              "writes only under --out: give those keys on the command line (key=value, e.g. a "
                              "directory under --out), or --allow-outside to write there")
    shared = [k for k in RUN_OUTPUTS if str(OmegaConf.select(cfg, k)) == str(_select(prov["config"], k))]
    if shared:
        raise DataError(f"the recorded run's {', '.join(shared)} lie outside its output_dir, so the new run would "
                        f"reuse its results: give {'=... '.join(shared)}=... (a new directory) after the run directory")
    return cfg, config


def _write_config(config: Dict[str, Any], out: Path) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / "reproduce.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def reproduced_config(prov: Dict[str, Any], out: Path, overrides=(), allow_env: bool = False,
                      allow_outside: bool = False):
    """The recorded config with its outputs moved to ``out`` (plus ``overrides``), validated as any config
    and checked (:func:`_checked_config`); written to ``out/reproduce.yaml``."""
    cfg, config = _checked_config(prov, out, overrides, allow_env, allow_outside)
    _write_config(config, out)
    return cfg


def _select(config: Dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def compared_metrics(metrics: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> Tuple[str, ...]:
    """The metrics a run of its task is judged on: :data:`COMPARED` (categorical), the CCC per dimension,
    its mean and the validation CCC mean (dimensional), both (multitask). The task and dimensions are
    the record's own (``metrics.json``), else its config's."""
    task = metrics.get("task") or _select(config or {}, "finetune.task") or "categorical"
    dims = metrics.get("dimensions") or _select(config or {}, "finetune.dimensions") or DEFAULT_DIMENSIONS
    ccc = (*(f"ccc_{d}" for d in dims), "ccc_mean", "val_ccc_mean")
    if task == "dimensional":
        return ccc
    if task == "multitask":
        return (*COMPARED, *ccc)
    return COMPARED


def _values(metrics: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Dict[str, float]]:
    rows = {str(f["fold"]): {k: f.get(k) for k in keys} for f in metrics.get("folds", [])}
    rows["mean"] = {k: (metrics.get("mean") or {}).get(k) for k in keys}
    return rows


def _delta(a: Any, b: Any) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return 0.0 if a is None and b is None else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


def _is_ccc(key: str) -> bool:
    return key.startswith(("ccc_", "val_ccc_"))


def compare(recorded: Dict[str, Any], new: Dict[str, Any], tolerance: float,
            metrics: Optional[Sequence[str]] = None) -> Tuple[str, bool]:
    """A table of per-fold differences and whether all are within ``tolerance`` (a fraction; UA / WA / F1
    shown in percent, Δ in points; CCC as is, Δ in CCC units). ``metrics``: default the recorded task's
    (:func:`compared_metrics`). A record holding none of them agrees with nothing."""
    if metrics is None:
        metrics = compared_metrics(recorded, (recorded.get("provenance") or {}).get("config"))
    keys = tuple(metrics)
    old_v, new_v = _values(recorded, keys), _values(new, keys)
    head = [f"{k} recorded{'' if _is_ccc(k) else ' %'} | reproduced{'' if _is_ccc(k) else ' %'} | Δ" for k in keys]
    lines = ["| fold | " + " | ".join(head) + " |", "|---|" + "---:|---:|---:|" * len(keys)]
    ok = set(old_v) == set(new_v)
    held = False
    for fold in sorted(set(old_v) | set(new_v), key=lambda f: (f == "mean", f)):
        a, b = old_v.get(fold, {}), new_v.get(fold, {})
        cells = []
        for k in keys:
            d = _delta(a.get(k), b.get(k))
            ok &= d <= tolerance
            held |= isinstance(a.get(k), (int, float))
            scale = 1 if _is_ccc(k) else 100
            fmt = lambda v: f"{scale * float(v):.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            cells.append(f"{fmt(a.get(k))} | {fmt(b.get(k))} | {scale * d:.2g}" + (" **" if d > tolerance else ""))
        lines.append(f"| {'mean' if fold == 'mean' else 'fold ' + fold} | " + " | ".join(cells) + " |")
    if not held:
        lines.append(f"(the recorded metrics hold none of {', '.join(keys)}: nothing to compare)")
    return "\n".join(lines), ok and held


def _code_differences(old: Dict[str, Any], new: Dict[str, Any], names=None) -> List[str]:
    out = []
    for key in ("commit", "dirty"):
        if (old.get("git") or {}).get(key) != (new.get("git") or {}).get(key):
            out.append(f"git {key}: {(old.get('git') or {}).get(key)} -> {(new.get('git') or {}).get(key)}")
    op, np_ = old.get("packages") or {}, new.get("packages") or {}
    for name in sorted(names if names is not None else set(op) | set(np_)):
        if op.get(name) != np_.get(name):
            out.append(f"{name}: {op.get(name)} -> {np_.get(name)}")
    return out


def provenance_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two runs' records: commit, dirty flag, packages, manifest, features, python."""
    out = _code_differences(old, new)
    for part in ("manifest", "features"):
        if (old.get(part) or {}).get("sha256") != (new.get(part) or {}).get("sha256"):
            out.append(f"{part} hash: {(old.get(part) or {}).get('sha256')} -> {(new.get(part) or {}).get('sha256')}")
    if old.get("python") != new.get("python"):
        out.append(f"python: {old.get('python')} -> {new.get('python')}")
    return out


def environment_differences(prov: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """``(differences, cautions)`` between a record and this checkout and environment: the commit, the
    dirty flag, the versions of the packages it recorded (the run's and each fold's, ``fold_code``) and
    python; cautions: folds reused from other code, uncommitted changes
    (recorded or here), which no commit comparison can see."""
    from serray.provenance import git_state, package_versions

    here = {"git": git_state(), "packages": package_versions(tuple(prov.get("packages") or ())),
            "python": platform.python_version()}
    diffs = _code_differences(prov, here, names=set(prov.get("packages") or ()))
    for fold, code in sorted((prov.get("fold_code") or {}).items(), key=lambda kv: int(kv[0])):
        # a fold reused from an earlier run was trained by its own code, not the run's
        for d in _code_differences(code, here, names=set(code.get("packages") or ())):
            if d not in diffs:
                diffs.append(f"fold {fold} (trained by its own run) {d}")
    if prov.get("python") and prov.get("python") != here["python"]:
        diffs.append(f"python: {prov.get('python')} -> {here['python']}")
    cautions = []
    if prov.get("folds_other_code"):
        cautions.append(f"folds {prov['folds_other_code']} of the recorded run were reused from a run of other code "
                        "than the record's commit names (fold_code): the rerun trains them with this checkout")
    if (prov.get("git") or {}).get("dirty"):
        cautions.append("the recorded run was made from a checkout with uncommitted changes: its code cannot be "
                        "checked out again, so the same commit is not the same code")
    if here["git"].get("dirty"):
        cautions.append("this checkout has uncommitted changes")
    return diffs, cautions


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def reproduce(run_dir: str | Path, out: Optional[str | Path] = None, tolerance: float = 0.0, overrides=(),
              echo: Callable[[str], Any] = print, *, allow_env: bool = False, allow_outside: bool = False,
              strict: bool = False, warn: Callable[[str], Any] = _stderr) -> bool:
    """Re-run ``run_dir`` into ``out`` and compare; True when every metric agrees within ``tolerance``.

    Refuses (a :class:`SerrayError`, nothing written) a recorded config that reads the environment
    (unless ``allow_env``) or writes outside ``out`` (unless ``allow_outside``); prints on ``warn`` what
    differs between the record and this checkout and environment, and with ``strict`` refuses then."""
    from serray import storage
    from serray.pipeline import run_pipeline
    from serray.progress import quiet

    metrics_path = find_metrics(run_dir)
    recorded, prov = read_record(metrics_path)
    target = Path(out) if out is not None else Path(str(Path(run_dir).resolve()) + "-reproduced")
    target = target.resolve()
    old_out = Path(str(prov["config"].get("output_dir", ""))).resolve()
    if target == old_out or old_out in target.parents or target in old_out.parents:
        raise DataError(f"--out {target} must lie outside the recorded run's output_dir {old_out} (and not hold it)")
    cfg, config = _checked_config(prov, target, overrides, allow_env, allow_outside)
    diffs, cautions = environment_differences(prov)
    if strict and (diffs or cautions):
        raise SerrayError("--strict: this checkout or environment is not the one the run was made from, so the "
                          "rerun could not tell a changed result from a changed environment:\n  "
                          + "\n  ".join([*diffs, *cautions]) + "\ncheck out the recorded commit (clean) and install "
                          "the recorded versions, or leave --strict out to rerun anyway")
    if diffs or cautions:
        warn("serray reproduce: this checkout or environment is not the one the run was made from (recorded -> here):"
             + "".join(f"\n  {d}" for d in diffs) + "".join(f"\n  note: {c}" for c in cautions)
             + "\nthe metrics may differ for that reason alone; --strict refuses to run in that case")
    _write_config(config, target)
    echo(f"reproducing {metrics_path} (commit {prov['git'].get('commit') or 'unknown'}"
         f"{', dirty' if prov['git'].get('dirty') else ''}, seed {prov['seed']}, folds {prov['folds']}) into {target}")
    with quiet(target / "logs"):
        run_pipeline(cfg, echo=echo)
    new_metrics = json.loads(storage.read_text(storage.join(cfg.finetune.dir, "metrics.json")))
    table, ok = compare(recorded, new_metrics, tolerance, compared_metrics(recorded, prov["config"]))
    echo(f"\nmetrics, recorded vs reproduced (Δ in points, CCC in its own units; ** beyond the tolerance "
         f"{tolerance:g}):\n{table}")
    diffs = provenance_differences(prov, new_metrics["provenance"])
    echo("made from: " + ("the same commit, packages, manifest and features" if not diffs else "; ".join(diffs)))
    echo("reproduced: every metric agrees" if ok else "NOT reproduced: metrics differ beyond the tolerance")
    return ok


__all__ = ["compare", "compared_metrics", "environment_differences", "env_reads", "find_metrics", "moved",
           "outside_outputs", "provenance_differences", "read_record", "reproduce", "reproduced_config"]
