"""Ray Tune sweeps over the adapter's hyper-parameters, with early stopping and the model registry.

One trial = leave-one-session-out on ``tune.folds`` (per fold: the fold's pre-training, then
fine-tuning), with the same code as ``serray pipeline``. Every fine-tuning epoch reaches Tune, so
ASHA stops poor trials on ``tune.scheduler_metric`` (validation UA); a finished trial reports its
objective ``tune.metric``, a *validation* metric (mean over its folds of the selected epoch's
validation UA): trials are never ranked on test data (a test metric there is a config error). The
chosen configuration is then run on ``tune.final_folds`` (default all five) and that LOSO result is
what is reported and registered (``selected_on`` says how it was chosen). Test metrics of trials are
shown in ``trials.md`` for information only.

A sweep never spends a trial on a configuration it already ran: when every leaf is discrete
(``choice`` / ``grid``), the configurations are enumerated: each grid point gets ``tune.num_samples``
distinct draws of the choice leaves (fewer when the choices run out). Trials with the same pre-training settings
share one pre-training (it lives under the sweep's directory, keyed by its config hash).

The search space lives in ``tune.search_space``, nested like the config; a leaf is one of
``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
``{randint: [lo, hi]}``. It is validated before any trial starts. Rerunning the same command with the
same ``tune.name`` resumes the sweep (``Tuner.restore``): finished trials are not rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from serray import storage
from serray.config import _all_keys, _schema, as_dict, derive
from serray.errors import ConfigError

log = logging.getLogger(__name__)

FORMS = ("choice", "grid", "uniform", "loguniform", "randint")
SPACE_FILE = "_serray_search_space.json"
TRIAL_KEY_PREFIX = "cfg/"  # param_space keys are "cfg/<dotted config key>"


# ---------------------------------------------------------------- search space


def flatten_space(space: Dict[str, Any], prefix: str = "") -> Dict[str, Tuple[str, list]]:
    """``{"adapter": {"mask_ratio": {"choice": [...]}}}`` -> ``{"adapter.mask_ratio": ("choice", [...])}``."""
    from collections.abc import Mapping

    schema_keys = set(_all_keys(_schema()))
    out: Dict[str, Tuple[str, list]] = {}
    for k, v in (space or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and len(v) == 1 and next(iter(v)) in FORMS:
            form, args = next(iter(v.items()))
            out[key] = (form, list(args) if not isinstance(args, (str, bytes)) and hasattr(args, "__iter__") else args)
        elif isinstance(v, Mapping) and v and all(isinstance(x, Mapping) for x in v.values()):
            out.update(flatten_space(v, f"{key}."))
        elif isinstance(v, Mapping) and len(v) == 1 and f"{key}.{next(iter(v))}" not in schema_keys:
            raise ConfigError(f"tune.search_space.{key}: unknown distribution form '{next(iter(v))}' "
                              f"(use one of: {', '.join(FORMS)})")
        else:
            raise ConfigError(f"tune.search_space.{key}: a leaf must be one form, e.g. {{choice: [a, b]}} "
                              f"(forms: {', '.join(FORMS)}); got {v!r}")
    return out


def validate_space(cfg) -> Dict[str, Tuple[str, list]]:
    """The flattened search space, checked against the schema and the value rules; errors are ConfigError."""
    import difflib

    flat = flatten_space(as_dict(cfg.tune.search_space))
    if not flat:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. "
                          "tune.search_space.adapter.mask_ratio.choice=[0.3,0.5]")
    schema = _schema()
    valid = [k for k in _all_keys(schema) if not k.startswith(("tune.", "ray.", "serve.", "registry."))]
    for key, (form, args) in flat.items():
        if key not in valid or isinstance(OmegaConf.select(schema, key), (dict, type(schema))):
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"tune.search_space: unknown config key '{key}'{hint}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.search_space.{key}: {form} needs a non-empty list, got {args!r}")
        if form in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                raise ConfigError(f"tune.search_space.{key}: {form} needs [low, high] with low < high, got {args}")
            if form == "loguniform" and args[0] <= 0:
                raise ConfigError(f"tune.search_space.{key}: loguniform needs low > 0, got {args}")
            probes = [args[0], args[1] - 1 if form == "randint" else args[1]]
        else:
            probes = args
        for value in probes:  # every value must make a valid config (types, ranges)
            derive(cfg, [_override(key, value)])
    return flat


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def is_discrete(flat: Dict[str, Tuple[str, list]]) -> bool:
    return all(form in ("choice", "grid") for form, _ in flat.values())


def enumerate_space(flat: Dict[str, Tuple[str, list]], num_samples: int, seed: int) -> List[Dict[str, Any]]:
    """The configurations of a discrete space, each at most once.

    As in Tune, every point of the ``grid`` leaves is run ``num_samples`` times; each run draws its
    ``choice`` leaves *without replacement* (seeded), so no configuration is run twice; a grid point
    gets fewer runs when its choices run out.
    """
    import itertools
    import random

    grid = [k for k, (form, _) in flat.items() if form == "grid"]
    choice = [k for k, (form, _) in flat.items() if form == "choice"]
    choices = [dict(zip(choice, v)) for v in itertools.product(*(flat[k][1] for k in choice))]
    out = []
    for i, point in enumerate(itertools.product(*(flat[k][1] for k in grid))):
        n = min(num_samples, len(choices))
        picked = sorted(random.Random(seed * 7919 + i).sample(range(len(choices)), n))
        out += [{**dict(zip(grid, point)), **choices[j]} for j in picked]
    return [{k: c[k] for k in flat} for c in out]


COMBO_KEY = "combo"  # param_space key of an enumerated configuration (a dict of dotted keys)


def param_space(flat: Dict[str, Tuple[str, list]], num_samples: int = 1, seed: int = 0) -> Dict[str, Any]:
    """Tune's param_space: enumerated configurations (discrete spaces) or distributions."""
    from ray import tune

    if is_discrete(flat):
        return {COMBO_KEY: tune.grid_search(enumerate_space(flat, num_samples, seed))}
    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {TRIAL_KEY_PREFIX + k: make[form](args) for k, (form, args) in flat.items()}


def trial_hyperparameters(config: Dict[str, Any]) -> Dict[str, Any]:
    if COMBO_KEY in config:
        return dict(config[COMBO_KEY])
    return {k[len(TRIAL_KEY_PREFIX):]: v for k, v in config.items() if k.startswith(TRIAL_KEY_PREFIX)}


def trial_config(cfg, hyper: Dict[str, Any], trial_dir: Path, folds: Optional[List[int]] = None):
    """The run config of one trial: the swept values, its own fine-tuning directory, a pre-training
    directory shared by every trial with the same pre-training settings, the sweep's folds."""
    from serray.train.pretrain import pretrain_hash

    trial_dir = Path(trial_dir)
    folds = list(cfg.tune.folds) if folds is None else folds
    tcfg = derive(cfg, [*[_override(k, v) for k, v in hyper.items()], f"finetune.dir={trial_dir / 'finetune'}",
                        "finetune.init_from=null", f"finetune.folds={json.dumps(folds)}", "finetune.register=false"])
    shared = Path(cfg.tune.dir) / cfg.tune.name / "pretrain" / pretrain_hash(tcfg)
    return derive(tcfg, [f"pretrain.dir={shared}"])


# ---------------------------------------------------------------- the trial


VAL_KEYS = ("val_ua", "val_wa", "val_macro_f1", "val_loss")


def _trial(config: Dict[str, Any], cfg_dict: Dict[str, Any]) -> None:
    """One Tune trial: per fold, pre-train (shared) and fine-tune (each epoch reported to Tune); report
    the validation objective and, for information, the test metrics."""
    import ray.tune

    from serray.train.finetune import fold_done, run_fold

    cfg = OmegaConf.create(cfg_dict)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(cfg.tune.dir) / cfg.tune.name / "trials" / trial_id
    hyper = trial_hyperparameters(config)
    tcfg = trial_config(cfg, hyper, trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "attempts.log", "a") as f:  # how often this trial ran (tests of resuming)
        f.write(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    folds = [fold_done(tcfg, fold) or run_fold(tcfg, fold, report_to_tune=True) for fold in tcfg.finetune.folds]
    val = {k: float(sum(f[k] for f in folds) / len(folds)) for k in VAL_KEYS if all(k in f for f in folds)}
    test = {f"test_{k}": float(sum(f[k] for f in folds) / len(folds)) for k in ("ua", "wa", "macro_f1")}
    ray.tune.report({**val, **test, "trial_dir": str(trial_dir), "done_trial": 1})


# ---------------------------------------------------------------- the sweep


def _space_hash(flat) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _scheduler(cfg):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    if t.scheduler == "asha":
        max_t = max(t.grace_period + 1, cfg.finetune.epochs * len(t.folds) + 1)
        return ASHAScheduler(metric=t.scheduler_metric, mode=t.mode, time_attr="training_iteration", max_t=max_t,
                             grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    raise ConfigError(f"tune.scheduler must be asha or fifo, got '{t.scheduler}'")


def best_trial(finished, metric: str, mode: str):
    """The row of the best finished trial by ``metric``; ties go to the first trial of the search space
    (lowest ``trial_id``), so the choice does not depend on the order in which trials happened to
    finish (an interrupted sweep and its resumed run must pick the same trial when scores tie)."""
    ranked = finished.sort_values([metric, "trial_id"], ascending=[mode == "min", True], kind="stable")
    return ranked.iloc[0]


def run_sweep(cfg, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run (or resume) the sweep; write the trial table and plots; register the best trial."""
    import ray.tune as tune

    from serray.pipeline import prepare_corpus
    from serray.ray_utils import init_ray
    from serray.train.pretrain import check_features

    if cfg.tune.mode not in ("max", "min"):
        raise ConfigError(f"tune.mode must be max or min, got '{cfg.tune.mode}'")
    for key in ("folds", "final_folds"):
        folds = cfg.tune[key] if cfg.tune[key] is not None else cfg.finetune.folds
        if not folds or any(f not in cfg.data.sessions for f in folds):
            raise ConfigError(f"tune.{key} must be a non-empty subset of data.sessions {list(cfg.data.sessions)}, got "
                              f"{list(folds)}")
    flat = validate_space(cfg)
    scheduler = _scheduler(cfg)
    if not storage.is_file(storage.join(cfg.features.dir, "_serray_features.json")):
        from serray.data.featurize import featurize

        prepare_corpus(cfg, echo)
        featurize(cfg)
    check_features(cfg)
    exp_dir = Path(cfg.tune.dir) / cfg.tune.name
    space_file = exp_dir / SPACE_FILE
    init_ray(cfg)
    from serray.train.finetune import trial_resources

    resources = trial_resources(cfg, extra_cpu=cfg.tune.cpus_per_trial)
    if cfg.tune.gpus_per_trial:
        resources["gpu"] = resources.get("gpu", 0) + cfg.tune.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(_trial, cfg_dict=as_dict(cfg)), resources)
    if tune.Tuner.can_restore(str(exp_dir)):
        stored = json.loads(space_file.read_text()) if space_file.is_file() else {}
        if stored.get("hash") not in (None, _space_hash(flat)):
            raise ConfigError(f"the sweep {exp_dir} exists with another search space ({stored.get('space')}); "
                              "choose another tune.name to start a new sweep")
        echo(f"resuming the sweep in {exp_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        n = (len(enumerate_space(flat, cfg.tune.num_samples, cfg.seed)) if is_discrete(flat) else cfg.tune.num_samples)
        how = "distinct configurations (drawn without replacement)" if is_discrete(flat) else "samples"
        echo(f"sweep {cfg.tune.name}: {len(flat)} hyper-parameters, {n} {how}, scheduler {cfg.tune.scheduler}, "
             f"folds {list(cfg.tune.folds)}; ranked on {cfg.tune.metric} (validation); the best is then run on "
             f"folds {final_folds(cfg)}")
        space = param_space(flat, cfg.tune.num_samples, cfg.seed)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=1 if COMBO_KEY in space else cfg.tune.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=str(Path(cfg.tune.dir)), name=cfg.tune.name, verbose=1),
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    space_file.write_text(json.dumps({"hash": _space_hash(flat), "space": {k: list(v) for k, v in flat.items()}}))
    grid = tuner.fit()
    return summarise_sweep(cfg, grid, flat, echo)


def _tune_statuses(grid) -> List[Tuple[str, str]]:
    """(trial id, Tune status) per result, in the grid's order (ResultGrid is built from these
    trials in order); empty when this Ray does not expose them."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [(t.trial_id, str(t.status)) for t in trials] if len(trials) == len(grid) else []


def summarise_sweep(cfg, grid, flat, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """trials.csv / trials.md / plots; runs the trial with the best validation objective on
    ``tune.final_folds`` and registers that result."""
    import pandas as pd

    exp_dir = Path(cfg.tune.dir) / cfg.tune.name
    rows, hypers = [], []
    tune_status = _tune_statuses(grid)
    for i, r in enumerate(grid):
        m = r.metrics or {}
        hyper = trial_hyperparameters(r.config or {})
        hypers.append(hyper)
        trial_id, state = tune_status[i] if i < len(tune_status) else (m.get("trial_id", Path(r.path).name), "TERMINATED")
        status = ("ERROR" if r.error is not None else "finished" if m.get("done_trial")
                  else "stopped early" if state == "TERMINATED" else "interrupted")
        rows.append({"trial_id": m.get("trial_id", trial_id), **hyper, "status": status,
                     **{k: m.get(k) for k in (*VAL_KEYS, "test_ua", "test_wa", "test_macro_f1", "training_iteration")},
                     "time_s": m.get("time_total_s"), "trial_dir": m.get("trial_dir")})
    df = pd.DataFrame(rows)
    df.to_csv(exp_dir / "trials.csv", index=False)
    (exp_dir / "trials.md").write_text(_markdown(df, list(flat)))
    _plots(df, list(flat), cfg.tune.metric, cfg.tune.mode, exp_dir)
    echo(_markdown(df, list(flat)))
    errors = [r.error for r in grid if r.error is not None]
    finished = df[df["status"] == "finished"]
    out: Dict[str, Any] = {"trials": rows, "dir": str(exp_dir), "errors": len(errors)}
    interrupted = int((df["status"] == "interrupted").sum())
    if interrupted:  # Ctrl-C / a stopped driver: nothing is registered from a partial sweep
        from serray.errors import SerrayError

        raise SerrayError(f"the sweep {exp_dir} was interrupted with {interrupted} trial(s) unfinished; "
                          "rerun the same command to resume it")
    if errors:
        echo(f"{len(errors)} trial(s) failed (first: {str(errors[0]).splitlines()[0][:300]}); "
             "rerun the same command to resume the sweep")
    if finished.empty:
        if errors:
            from serray.errors import SerrayError

            raise SerrayError(f"no trial of the sweep {exp_dir} finished; {len(errors)} failed")
        return out
    best = best_trial(finished, cfg.tune.metric, cfg.tune.mode)
    out["best"] = best.to_dict()
    echo(f"best trial {best['trial_id']}: {cfg.tune.metric}={best[cfg.tune.metric]:.4f} "
         + " ".join(f"{k}={best[k]}" for k in flat))
    hyper = hypers[best.name]  # the trial's own values (a table cell turns None into NaN)
    final = run_final(cfg, hyper, best["trial_id"], echo)
    out["final"] = {"mean": final["mean"], "std": final["std"], "folds": final_folds(cfg)}
    if final.get("registered"):
        out["registered"] = final["registered"]
    if errors:
        from serray.errors import SerrayError

        raise SerrayError(f"{len(errors)} trial(s) of the sweep failed; rerun the same command to resume")
    return out


def final_folds(cfg) -> List[int]:
    return list(cfg.tune.final_folds if cfg.tune.final_folds is not None else cfg.finetune.folds)


def run_final(cfg, hyper: Dict[str, Any], trial_id: str, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """The chosen configuration on ``tune.final_folds``: the LOSO result that is reported and
    registered (pre-trainings shared with the sweep's trials are reused)."""
    from serray.train.finetune import register_result, run_finetune

    exp_dir = Path(cfg.tune.dir) / cfg.tune.name
    # fault injection is how a test interrupts a trial, not part of a configuration
    hyper = {k: (None if k.endswith(".fail_at_step") else v) for k, v in hyper.items()}
    fcfg = trial_config(cfg, hyper, exp_dir / "final", folds=final_folds(cfg))
    echo(f"running the chosen configuration ({trial_id}: " + ", ".join(f"{k}={v}" for k, v in hyper.items())
         + f") on folds {final_folds(cfg)}")
    summary = run_finetune(fcfg)
    from serray.train.results import markdown_table

    echo(markdown_table(summary, f"chosen configuration, leave-one-session-out on folds {final_folds(cfg)}"))
    if cfg.tune.register_best:
        selected = f"tune {cfg.tune.name}: {cfg.tune.metric} ({cfg.tune.mode}) over folds {list(cfg.tune.folds)}"
        entry = register_result(fcfg, summary, source="tune", hyperparameters=hyper, selected_on=selected)
        summary["registered"] = entry["id"]
        echo(f"registered as {entry['id']} in {storage.describe(cfg.registry.dir)}")
    return summary


TEST_INFO = ("test_ua", "test_wa", "test_macro_f1")


def _markdown(df, keys: List[str]) -> str:
    cols = ["trial_id", *keys, "status", "val_ua", "val_loss", *TEST_INFO, "training_iteration"]
    names = {c: f"{c} (info only)" for c in TEST_INFO}
    lines = ["| " + " | ".join(names.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{100 * v:.2f}" if c in ("val_ua", *TEST_INFO) and isinstance(v, float) and v == v
                         else "-" if v is None or (isinstance(v, float) and v != v)
                         else f"{v:g}" if isinstance(v, float) else str(v))  # a column with gaps is float: 2.0 -> 2
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nTrials are ranked on validation metrics only; test columns are shown for information and "
                 f"were not used to choose.")
    return "\n".join(lines) + "\n"


def _plots(df, keys: List[str], metric: str, mode: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = df[df["status"] == "finished"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.scatter([str(v) if not isinstance(v, (int, float)) else v for v in done[k]], done[metric])
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
    ax = axes[0][-1]
    if not done.empty:
        vals = list(done[metric])
        best = [max(vals[: i + 1]) if mode == "max" else min(vals[: i + 1]) for i in range(len(vals))]
        ax.plot(range(1, len(vals) + 1), best, marker="o")
    ax.set_xlabel("finished trials")
    ax.set_ylabel(f"best {metric} so far")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
