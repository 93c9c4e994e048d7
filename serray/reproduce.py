"""``serray reproduce RUN_DIR [--out DIR]``: make a run again from the provenance record of its
``metrics.json`` and compare the metrics, fold by fold.

The recorded config is the run's resolved config; every path in it under the run's ``output_dir``
is moved under ``--out`` (default ``RUN_DIR-reproduced``), so the new run writes nothing into the old
one and a synthetic corpus under ``output_dir`` is made again from its seed; paths outside (a real
corpus) are read where they were. The new run is ``serray pipeline`` with that config. On the same
machine and packages a run is deterministic per seed, so the metrics must agree exactly; differences
beyond ``--tolerance`` exit with status 1, a table showing each fold. What the runs were made from
(commit, dirty flag, package versions, manifest and feature hashes) is compared too and every
difference printed: that is where to look when the numbers differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from serray.errors import DataError
from serray.provenance import REQUIRED, missing_fields

#: Outputs a reproduction must not share with the recorded run (it would reuse them instead of training).
RUN_OUTPUTS = ("pretrain.dir", "finetune.dir", "registry.dir")
#: The metrics compared, per fold and for the mean.
COMPARED = ("ua", "wa", "macro_f1", "val_ua")


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


def reproduced_config(prov: Dict[str, Any], out: Path, overrides=()):
    """The recorded config with its outputs moved to ``out`` (plus ``overrides``), validated as any config."""
    import yaml

    from serray.config import load_config

    config = dict(prov["config"])
    old = str(config.get("output_dir") or "")
    if not old:
        raise DataError("the provenance record's config has no output_dir")
    config = moved(config, old, str(out))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reproduce.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(path, list(overrides))


def _select(config: Dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _values(metrics: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    rows = {str(f["fold"]): {k: f.get(k) for k in COMPARED} for f in metrics.get("folds", [])}
    rows["mean"] = {k: (metrics.get("mean") or {}).get(k) for k in COMPARED}
    return rows


def _delta(a: Any, b: Any) -> float:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return 0.0 if a is None and b is None else math.inf
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


def compare(recorded: Dict[str, Any], new: Dict[str, Any], tolerance: float) -> Tuple[str, bool]:
    """A table of per-fold differences (percentage points) and whether all are within ``tolerance``."""
    old_v, new_v = _values(recorded), _values(new)
    lines = ["| fold | " + " | ".join(f"{k} recorded % | reproduced % | Δ" for k in COMPARED) + " |",
             "|---|" + "---:|---:|---:|" * len(COMPARED)]
    ok = set(old_v) == set(new_v)
    for fold in sorted(set(old_v) | set(new_v), key=lambda f: (f == "mean", f)):
        a, b = old_v.get(fold, {}), new_v.get(fold, {})
        cells = []
        for k in COMPARED:
            d = _delta(a.get(k), b.get(k))
            ok &= d <= tolerance
            pct = lambda v: f"{100 * float(v):.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
            cells.append(f"{pct(a.get(k))} | {pct(b.get(k))} | {100 * d:.2g}" + (" **" if d > tolerance else ""))
        lines.append(f"| {'mean' if fold == 'mean' else 'fold ' + fold} | " + " | ".join(cells) + " |")
    return "\n".join(lines), ok


def provenance_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two runs' records: commit, dirty flag, packages, manifest, features, python."""
    out = []
    for key in ("commit", "dirty"):
        if old["git"].get(key) != new["git"].get(key):
            out.append(f"git {key}: {old['git'].get(key)} -> {new['git'].get(key)}")
    for name in sorted(set(old["packages"]) | set(new["packages"])):
        if old["packages"].get(name) != new["packages"].get(name):
            out.append(f"{name}: {old['packages'].get(name)} -> {new['packages'].get(name)}")
    for part in ("manifest", "features"):
        if (old.get(part) or {}).get("sha256") != (new.get(part) or {}).get("sha256"):
            out.append(f"{part} hash: {(old.get(part) or {}).get('sha256')} -> {(new.get(part) or {}).get('sha256')}")
    if old.get("python") != new.get("python"):
        out.append(f"python: {old.get('python')} -> {new.get('python')}")
    return out


def reproduce(run_dir: str | Path, out: Optional[str | Path] = None, tolerance: float = 0.0, overrides=(),
              echo: Callable[[str], Any] = print) -> bool:
    """Re-run ``run_dir`` into ``out`` and compare; True when every metric agrees within ``tolerance``."""
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
    cfg = reproduced_config(prov, target, overrides)
    shared = [k for k in RUN_OUTPUTS if str(OmegaConf.select(cfg, k)) == str(_select(prov["config"], k))]
    if shared:
        raise DataError(f"the recorded run's {', '.join(shared)} lie outside its output_dir, so the new run would "
                        f"reuse its results: give {'=... '.join(shared)}=... (a new directory) after the run directory")
    echo(f"reproducing {metrics_path} (commit {prov['git'].get('commit') or 'unknown'}"
         f"{', dirty' if prov['git'].get('dirty') else ''}, seed {prov['seed']}, folds {prov['folds']}) into {target}")
    with quiet(target / "logs"):
        run_pipeline(cfg, echo=echo)
    new_metrics = json.loads(storage.read_text(storage.join(cfg.finetune.dir, "metrics.json")))
    table, ok = compare(recorded, new_metrics, tolerance)
    echo(f"\nmetrics, recorded vs reproduced (Δ in points; ** beyond the tolerance {tolerance:g}):\n{table}")
    diffs = provenance_differences(prov, new_metrics["provenance"])
    echo("made from: " + ("the same commit, packages, manifest and features" if not diffs else "; ".join(diffs)))
    echo("reproduced: every metric agrees" if ok else "NOT reproduced: metrics differ beyond the tolerance")
    return ok


__all__ = ["compare", "find_metrics", "moved", "provenance_differences", "read_record", "reproduce"]
