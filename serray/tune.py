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


VAL_KEYS = ("val_ua", "val_wa", "val_macro_f1", "val_loss", "val_bal_loss", "val_ccc_mean", "val_ccc_valence", "val_ccc_arousal",
            "val_ccc_dominance")  # (val_ccc_*: finetune.task dimensional / multitask; each reported when every fold has it)


def _trial(config: Dict[str, Any], cfg_dict: Dict[str, Any], folds: List[int]) -> None:
    """One Tune trial: per fold of ``folds``, pre-train (shared) and fine-tune (each epoch reported to
    Tune), **never scoring the test split**; report the validation objective (mean over ``folds``) and
    the sessions its validation speakers come from."""
    import ray.tune

    from serray.train.finetune import run_fold

    cfg = OmegaConf.create(cfg_dict)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(cfg.tune.dir) / cfg.tune.name / _experiment(cfg, folds) / "trials" / trial_id
    hyper = trial_hyperparameters(config)
    tcfg = trial_config(cfg, hyper, trial_dir, folds=folds)
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "attempts.log", "a") as f:  # how often this trial ran (tests of resuming)
        f.write(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    results = [_selected(tcfg, fold) or run_fold(tcfg, fold, report_to_tune=True, score_test=False) for fold in folds]
    val = {k: float(sum(r[k] for r in results) / len(results)) for k in VAL_KEYS if all(k in r for r in results)}
    val_sessions = sorted({int(g) for r in results for g in r["val_sessions"]})
    ray.tune.report({**val, "val_sessions": json.dumps(val_sessions), "trial_dir": str(trial_dir), "done_trial": 1})


def _selected(cfg, fold: int) -> Optional[Dict[str, Any]]:
    """A fold this trial already trained and selected (a resumed trial), or None."""
    from serray.train.finetune import FOLD_SELECTION, fold_record

    record = fold_record(cfg, fold, FOLD_SELECTION)
    return record if record and "val_sessions" in record else None  # older records lack the guard's input


# ---------------------------------------------------------------- the sweep


def _space_hash(flat) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _scheduler(cfg, folds: List[int]):
    """ASHA on ``tune.scheduler_metric`` in that metric's own direction (never ``tune.mode``, which is
    the objective's), one rung per fine-tuning epoch of the trial's folds; or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from serray.config import metric_mode

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    max_t = max(t.grace_period + 1, cfg.finetune.epochs * len(folds) + 1)
    return ASHAScheduler(metric=t.scheduler_metric, mode=metric_mode(t.scheduler_metric), time_attr="training_iteration",
                         max_t=max_t, grace_period=t.grace_period, reduction_factor=t.reduction_factor)


def objective_mode(cfg) -> str:
    from serray.config import metric_mode

    return cfg.tune.mode or metric_mode(cfg.tune.metric)


#: what breaks a tie on the sweep's metric, in order: a proper score of the same validation predictions
#: (the class-balanced cross-entropy, lower is better: on a one-speaker validation set UA ties often, and
#: in a nested 2 x 2 sweep every trial of a fold once tied), then the plain cross-entropy
TIE_BREAKS = ("val_bal_loss", "val_loss")


def best_trial(finished, metric: str, mode: str):
    """The row of the best finished trial by ``metric``; ties are broken by :data:`TIE_BREAKS` (lower
    is better) and only then by the trial id (the first trial of the search space), so the choice does
    not depend on the order in which trials happened to finish (an interrupted sweep and its resumed run
    pick the same trial)."""
    breaks = [k for k in TIE_BREAKS if k in finished.columns and k != metric and finished[k].notna().all()]
    ranked = finished.sort_values([metric, *breaks, "trial_id"], ascending=[mode == "min", *[True] * len(breaks), True],
                                  kind="stable")
    return ranked.iloc[0]


def sweep_folds(cfg) -> List[int]:
    """The folds a sweep runs: ``tune.folds`` (null: ``finetune.folds``)."""
    return list(cfg.tune.folds if cfg.tune.folds is not None else cfg.finetune.folds)


def final_folds(cfg) -> List[int]:
    return list(cfg.tune.final_folds if cfg.tune.final_folds is not None else cfg.finetune.folds)


def _experiment(cfg, folds: List[int]) -> str:
    """The Tune experiment of some folds: ``fold<k>`` per outer fold (nested), ``trials`` (non-nested)."""
    return f"fold{folds[0]}" if cfg.tune.selection == "nested" else "trials"


def run_sweep(cfg, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run (or resume) the sweep; write the trial tables and plots; test and register the choice.

    ``tune.selection=nested`` (default): one Tune experiment per outer fold ``k`` of ``tune.folds``,
    whose trials train on fold ``k``'s training sessions and are ranked on its validation speakers
    only; fold ``k`` is then tested once, with the model of the configuration chosen for it.
    ``non_nested``: one experiment ranked on the mean over ``tune.folds``, the chosen configuration
    run on ``tune.final_folds`` (labelled non-nested: those folds' test sessions helped choose it).
    """
    from serray.data.prepare import prepare_corpus
    from serray.ray_utils import init_ray
    from serray.data.features.featurize import check_features

    flat = validate_space(cfg)
    if not storage.is_file(storage.join(cfg.features.dir, "_serray_features.json")):
        from serray.data.features.featurize import featurize

        prepare_corpus(cfg, echo)
        featurize(cfg)
    check_features(cfg)
    root = Path(cfg.tune.dir) / cfg.tune.name
    space_file = root / SPACE_FILE
    key = sweep_key(cfg, flat)
    check_same_sweep(cfg, root, key)
    root.mkdir(parents=True, exist_ok=True)
    space_file.write_text(json.dumps({**key, "space": {k: list(v) for k, v in flat.items()}}))
    init_ray(cfg)
    from serray.tracking import Tracker, config_params, stage_key

    tracker = Tracker.of(cfg)  # one MLflow run for the sweep, a child per trial and for the final run
    with tracker.run(stage_key("sweep", key["hash"], str(root), cfg.tune.selection), f"sweep {cfg.tune.name}",
                     tags={"stage": "sweep", "selection": cfg.tune.selection},
                     params={**config_params(cfg), **{f"space.{k}": f"{form} {list(args)}" for k, (form, args) in flat.items()}}):
        return _sweep(cfg, flat, echo)


def _sweep(cfg, flat, echo) -> Dict[str, Any]:
    root = Path(cfg.tune.dir) / cfg.tune.name
    n = len(enumerate_space(flat, cfg.tune.num_samples, cfg.seed)) if is_discrete(flat) else cfg.tune.num_samples
    how = "distinct configurations (drawn without replacement)" if is_discrete(flat) else "samples"
    if cfg.tune.selection == "nested":
        echo(f"sweep {cfg.tune.name} (nested): {len(flat)} hyper-parameters, {n} {how} per outer fold, scheduler "
             f"{cfg.tune.scheduler}; for each of folds {sweep_folds(cfg)}, trials are ranked on {cfg.tune.metric} of "
             "that fold's validation speakers only, and the fold is tested once with its choice")
        return _nested(cfg, flat, echo)
    echo(f"sweep {cfg.tune.name} (NON-NESTED): {len(flat)} hyper-parameters, {n} {how}, scheduler "
         f"{cfg.tune.scheduler}, folds {sweep_folds(cfg)}; ranked on {cfg.tune.metric} (validation); the best is run "
         f"on folds {final_folds(cfg)}. Those folds' test sessions supply validation speakers of the others: "
         "the result is labelled non-nested and is never the registry's best")
    grid, exp_dir = _fit(cfg, flat, sweep_folds(cfg), echo)
    table = trial_table(cfg, grid, flat, exp_dir)
    echo(_markdown(table, list(flat), cfg.tune.metric))
    best = _finished_best(cfg, grid, table, exp_dir)
    (root / "trials.md").write_text(f"# Sweep {cfg.tune.name}: NON-NESTED selection\n\n{selected_on(cfg)}: the "
                                    f"result is not comparable with nested ones.\n\n" + _markdown(table, list(flat), cfg.tune.metric))
    out: Dict[str, Any] = {"trials": table.to_dict("records"), "dir": str(root), "best": best.to_dict()}
    hyper = trial_hyperparameters(grid[int(best.name)].config or {})
    final = run_final(cfg, hyper, best["trial_id"], echo)
    out["final"] = {"mean": final["mean"], "std": final["std"], "folds": final_folds(cfg)}
    if final.get("registered"):
        out["registered"] = final["registered"]
    return out


#: sections and keys a resumed sweep may change (where it runs, how it is logged and served; the search
#: space, selection and folds are compared on their own)
_RESUMABLE = ("tracking.", "ray.", "serve.", "segment.", "export.", "tune.", "finetune.folds")


def sweep_config(cfg) -> Dict[str, str]:
    """What a sweep's trials are made of besides the search space: every other config key that is not
    about where it runs or how it is logged (a resumed sweep must agree on all of them), flat as the
    MLflow params are (:func:`serray.tracking.config_params`)."""
    from serray.tracking import config_params

    return {k: v for k, v in config_params(cfg).items() if not k.startswith(_RESUMABLE)}


def sweep_key(cfg, flat) -> Dict[str, Any]:
    """What identifies a sweep: its search space, selection, folds and the rest of its config."""
    return {"hash": _space_hash(flat), "selection": cfg.tune.selection, "folds": sweep_folds(cfg),
            "config": sweep_config(cfg)}


def check_same_sweep(cfg, root: Path, key: Dict[str, Any]) -> None:
    """A sweep directory is resumed only by the config that made it: the same ``tune.name`` with another
    search space, selection, folds, task, corpus or recipe is refused before any trial runs, naming
    what differs."""
    space_file = root / SPACE_FILE
    stored = json.loads(space_file.read_text()) if space_file.is_file() else {}
    if not stored:
        return
    if {k: stored.get(k) for k in ("hash", "selection", "folds")} != {k: key[k] for k in ("hash", "selection", "folds")}:
        raise ConfigError(f"the sweep {root} exists with another search space, selection or folds "
                          f"({stored.get('space')}, {stored.get('selection')}, folds {stored.get('folds')}); "
                          "choose another tune.name to start a new sweep")
    before, now = stored.get("config"), key["config"]
    if before is None:
        return  # a sweep recorded before the config was: resumed as before
    differ = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise ConfigError(f"the sweep {root} was made by another config ({shown}{more}); choose another "
                          f"tune.name to start a new sweep (e.g. tune.name={cfg.tune.name}-2)")


def _fit(cfg, flat, folds: List[int], echo):
    """Run (or resume) the Tune experiment of trials on ``folds``; the result grid and its directory."""
    import ray.tune as tune

    from serray.tracking import Tracker
    from serray.train.finetune import trial_resources

    exp_dir = Path(cfg.tune.dir) / cfg.tune.name / _experiment(cfg, folds)
    tracker = Tracker.of(cfg)
    tracking = tracker.tune_callback(tracker.current, f"trial/{_space_hash(flat)}/{exp_dir.name}",
                                     params_of=lambda c: {**trial_hyperparameters(c), "folds": folds},
                                     tags={"stage": "trial", "experiment": exp_dir.name})
    resources = trial_resources(cfg, extra_cpu=cfg.tune.cpus_per_trial)
    if cfg.tune.gpus_per_trial:
        resources["gpu"] = resources.get("gpu", 0) + cfg.tune.gpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(_trial, cfg_dict=as_dict(cfg), folds=list(folds)), resources)
    if tune.Tuner.can_restore(str(exp_dir)):
        echo(f"resuming {exp_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        # a restored Tuner brings back the RunConfig it pickled (Tuner.restore takes none): this run's tracking
        # callback replaces the pickled one (its trials find their MLflow runs by key and continue them)
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = [c for c in (run_config.callbacks or []) if not getattr(c, "serray_tracking", False)] \
            + ([tracking] if tracking is not None else [])
    else:
        space = param_space(flat, cfg.tune.num_samples, cfg.seed)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=1 if COMBO_KEY in space else cfg.tune.num_samples,
                                        scheduler=_scheduler(cfg, folds),
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=str(exp_dir.parent), name=exp_dir.name, verbose=1,
                                      callbacks=[tracking] if tracking is not None else None),
        )
    return tuner.fit(), exp_dir


def _finished_best(cfg, grid, table, exp_dir: Path):
    """The best finished trial of one experiment, or a clear error when it was interrupted / failed."""
    from serray.errors import SerrayError

    errors = [r.error for r in grid if r.error is not None]
    interrupted = int((table["status"] == "interrupted").sum())
    if interrupted:  # Ctrl-C / a stopped driver: nothing is tested or registered from a partial sweep
        raise SerrayError(f"the sweep {exp_dir} was interrupted with {interrupted} trial(s) unfinished; "
                          "rerun the same command to resume it")
    if errors:
        raise SerrayError(f"{len(errors)} trial(s) of {exp_dir} failed (first: {str(errors[0]).splitlines()[0][:300]}); "
                          "rerun the same command to resume the sweep")
    finished = table[table["status"] == "finished"]
    if finished.empty:
        raise SerrayError(f"no trial of the sweep {exp_dir} finished")
    return best_trial(finished, cfg.tune.metric, objective_mode(cfg))


def _tune_statuses(grid) -> List[Tuple[str, str]]:
    """(trial id, Tune status) per result, in the grid's order (ResultGrid is built from these
    trials in order); empty when this Ray does not expose them."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return [(t.trial_id, str(t.status)) for t in trials] if len(trials) == len(grid) else []


def trial_table(cfg, grid, flat, exp_dir: Path):
    """One row per trial (its swept values, status, validation metrics, the sessions of its validation
    speakers), in the grid's order; written to ``exp_dir/trials.csv`` with ``sweep.png``."""
    import pandas as pd

    rows = []
    tune_status = _tune_statuses(grid)
    for i, r in enumerate(grid):
        m = r.metrics or {}
        hyper = trial_hyperparameters(r.config or {})
        trial_id, state = tune_status[i] if i < len(tune_status) else (m.get("trial_id", Path(r.path).name), "TERMINATED")
        status = ("ERROR" if r.error is not None else "finished" if m.get("done_trial")
                  else "stopped early" if state == "TERMINATED" else "interrupted")
        rows.append({"trial_id": m.get("trial_id", trial_id), **hyper, "status": status,
                     **{k: m.get(k) for k in (*VAL_KEYS, "training_iteration")}, "val_sessions": m.get("val_sessions"),
                     "time_s": m.get("time_total_s"), "trial_dir": m.get("trial_dir")})
    df = pd.DataFrame(rows)
    exp_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(exp_dir / "trials.csv", index=False)
    _plots(df, list(flat), cfg.tune.metric, objective_mode(cfg), exp_dir)
    return df


def check_nested(fold: int, row) -> None:
    """The leakage guard of a nested choice: the trial chosen for fold ``fold`` was ranked on validation
    speakers of other sessions only (raises AssertionError otherwise)."""
    sessions = json.loads(row["val_sessions"]) if isinstance(row.get("val_sessions"), str) else row.get("val_sessions")
    assert sessions is not None, f"trial {row['trial_id']} reported no validation sessions"
    assert fold not in sessions, (f"leakage: fold {fold}'s configuration was ranked on validation speakers of its "
                                  f"test session (trial {row['trial_id']}, validation sessions {sessions})")


def _nested(cfg, flat, echo) -> Dict[str, Any]:
    """Per outer fold: its own experiment, ranking and choice; then its test, once; then the LOSO
    result of the per-fold choices, written under ``final/finetune`` and registered."""
    from serray.train.finetune import fold_done, test_fold

    root = Path(cfg.tune.dir) / cfg.tune.name
    final_dir = root / "final" / "finetune"
    choices, results, tables = {}, [], {}
    for fold in sweep_folds(cfg):
        grid, exp_dir = _fit(cfg, flat, [fold], echo)
        table = tables[fold] = trial_table(cfg, grid, flat, exp_dir)
        best = _finished_best(cfg, grid, table, exp_dir)
        check_nested(fold, best)
        hyper = trial_hyperparameters(grid[int(best.name)].config or {})
        tcfg = trial_config(cfg, hyper, Path(best["trial_dir"]), folds=[fold])
        hyper = without_faults(hyper)
        res = fold_done(tcfg, fold) or test_fold(tcfg, fold)  # the fold's one test scoring
        _copy_fold(Path(tcfg.finetune.dir) / f"fold{fold}", final_dir / f"fold{fold}")
        choices[fold] = {"trial_id": str(best["trial_id"]), "hyperparameters": hyper,
                         cfg.tune.metric: float(best[cfg.tune.metric]), "ranked_on": f"fold {fold}'s validation speakers "
                         f"(sessions {json.loads(best['val_sessions'])})", f"test_{_test_key(res)}": float(res[_test_key(res)])}
        results.append(res)
        echo(f"fold {fold}: chose trial {best['trial_id']} ({cfg.tune.metric}={best[cfg.tune.metric]:.4f} on fold {fold}'s "
             f"validation speakers; " + ", ".join(f"{k}={v}" for k, v in hyper.items()) + "); " + (f"test UA {100 * res['ua']:.2f}" if "ua" in res else f"test CCC {res['ccc_mean']:.3f}"))
    (root / "trials.md").write_text(_nested_markdown(cfg, flat, tables, choices))
    return _finish_nested(cfg, flat, results, choices, final_dir, echo)


def without_faults(hyper: Dict[str, Any]) -> Dict[str, Any]:
    """Swept values without fault injection (how a test interrupts a trial, not part of a configuration)."""
    return {k: (None if k.endswith(".fail_at_step") else v) for k, v in hyper.items()}


def _copy_fold(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("fault_injected.marker"))


def _test_key(res: Dict[str, Any]) -> str:
    """The test metric a fold result is reported by: UA, or mean CCC for a dimensional task."""
    return "ua" if "ua" in res else "ccc_mean"


def _test_cell(choice: Dict[str, Any]) -> str:
    return f"{100 * choice['test_ua']:.2f}" if "test_ua" in choice else f"CCC {choice['test_ccc_mean']:.3f}"


def selected_on(cfg) -> str:
    m = f"{cfg.tune.metric} ({objective_mode(cfg)})"
    if cfg.tune.selection == "nested":
        return f"tune {cfg.tune.name}, nested: per outer fold, {m} on that fold's validation speakers only"
    return (f"tune {cfg.tune.name}, NON-NESTED: {m} over folds {sweep_folds(cfg)}, whose validation speakers include "
            "test sessions of other folds")


def _finish_nested(cfg, flat, results, choices, final_dir: Path, echo) -> Dict[str, Any]:
    from serray.train.tasks import loso_table
    from serray.train.finetune import write_loso

    folds = sweep_folds(cfg)
    run_cfg = derive(cfg, [f"finetune.folds={json.dumps(folds)}", f"finetune.dir={final_dir}", "finetune.init_from=null"])
    sweep_id = hashlib.sha256(json.dumps({"space": _space_hash(flat), "choices": {str(k): v["trial_id"] for k, v in
                                                                              choices.items()}}, sort_keys=True).encode()).hexdigest()[:16]
    selection = {"mode": "nested", "metric": cfg.tune.metric, "per_fold": {str(k): v for k, v in choices.items()},
                 "selected_on": selected_on(cfg)}
    summary = write_loso(run_cfg, results, str(final_dir), {"selection": selection}, config_hash=sweep_id)
    echo(loso_table(cfg, summary, f"nested sweep: each fold tested once with its own choice, folds {folds}"))
    from serray.tracking import Tracker, log_loso, stage_key

    tracker = Tracker.of(cfg)
    with tracker.run(stage_key("final", sweep_id, str(final_dir)), "final (nested)", tags={"stage": "final", "selection": "nested"},
                     params={f"fold{k}.{h}": v for k, c in choices.items() for h, v in
                             {"trial_id": c["trial_id"], **c["hyperparameters"]}.items()}) as run_id:
        log_loso(tracker, run_id, summary, str(final_dir))
        tracker.log_artifacts(run_id, [Path(cfg.tune.dir) / cfg.tune.name / "trials.md"])
        return _register_nested(cfg, summary, choices, selection, run_cfg, sweep_id, final_dir, run_id, echo)


def _register_nested(cfg, summary, choices, selection, run_cfg, sweep_id, final_dir: Path, run_id, echo) -> Dict[str, Any]:
    from serray.train.finetune import register_result

    folds = sweep_folds(cfg)
    out: Dict[str, Any] = {"dir": str(final_dir.parent.parent), "choices": choices,
                           "final": {"mean": summary["mean"], "std": summary["std"], "folds": folds}}
    if cfg.tune.register_best:
        from serray.train.tasks import task_of

        sel = task_of(cfg).select_metric(cfg)  # the metric the task selects on (val UA; a dimensional task's CCC)
        best_fold = max(summary["folds"], key=lambda f: (f.get(sel, 0.0), -f["fold"]))["fold"]
        model_cfg = trial_config(cfg, choices[best_fold]["hyperparameters"], final_dir.parent, folds=[best_fold])
        entry = register_result(run_cfg, summary, source="tune", hyperparameters=choices[best_fold]["hyperparameters"],
                                selected_on=selected_on(cfg), selection="nested", model_cfg=model_cfg,
                                finetune_dir=str(final_dir),
                                extra={"config_hash": sweep_id, "per_fold": selection["per_fold"],
                                       **({"mlflow_run_id": run_id} if run_id else {})})
        out["registered"] = entry["id"]
        echo(f"registered as {entry['id']} in {storage.describe(cfg.registry.dir)}")
    return out


def run_final(cfg, hyper: Dict[str, Any], trial_id: str, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Non-nested: the chosen configuration on ``tune.final_folds``, labelled non-nested, registered
    (pre-trainings shared with the sweep's trials are reused)."""
    from serray.train.finetune import run_finetune
    from serray.train.tasks import loso_table

    exp_dir = Path(cfg.tune.dir) / cfg.tune.name
    hyper = without_faults(hyper)
    fcfg = derive(trial_config(cfg, hyper, exp_dir / "final", folds=final_folds(cfg)),
                  [f"finetune.register={str(bool(cfg.tune.register_best)).lower()}"])
    echo(f"running the chosen configuration ({trial_id}: " + ", ".join(f"{k}={v}" for k, v in hyper.items())
         + f") on folds {final_folds(cfg)}")
    selection = {"mode": "non-nested", "metric": cfg.tune.metric, "trial_id": trial_id, "hyperparameters": hyper,
                 "selected_on": selected_on(cfg)}
    summary = run_finetune(fcfg, extra={"selection": selection}, selection="non-nested", hyperparameters=hyper,
                           selected_on=selected_on(cfg))
    echo(loso_table(cfg, summary, f"chosen configuration (NON-NESTED selection), leave-one-session-out on folds "
                                 f"{final_folds(cfg)}"))
    if summary.get("registered"):
        echo(f"registered as {summary['registered']} in {storage.describe(cfg.registry.dir)} (non-nested: never the "
             "registry's best; serve it by id)")
    return summary


def _markdown(df, keys: List[str], metric: str) -> str:
    cols = ["trial_id", *keys, "status", "val_ua", "val_bal_loss", "val_loss", "val_sessions", "training_iteration"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{100 * v:.2f}" if c == "val_ua" and isinstance(v, float) and v == v
                         else "-" if v is None or (isinstance(v, float) and v != v)
                         else f"{v:g}" if isinstance(v, float) else str(v))  # a column with gaps is float: 2.0 -> 2
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nTrials are ranked on {metric} (validation speakers) only; no trial scores the test split.")
    return "\n".join(lines) + "\n"


def _nested_markdown(cfg, flat, tables, choices) -> str:
    parts = [f"# Sweep {cfg.tune.name}: nested selection", "",
             f"Each outer fold k has its own trials, trained on the other sessions and ranked on {cfg.tune.metric} of "
             "validation speakers drawn from those sessions; fold k is tested once, with the configuration chosen for "
             "it. No trial scores a test split.", "",
             "| fold | chosen trial | " + " | ".join(flat) + f" | {cfg.tune.metric} | ranked on | test UA % |",
             "|---:|---|" + "---|" * len(flat) + "---:|---|---:|"]
    for fold, c in choices.items():
        parts.append(f"| {fold} | {c['trial_id']} | " + " | ".join(str(c["hyperparameters"].get(k)) for k in flat)
                     + f" | {c[cfg.tune.metric]:.4f} | {c['ranked_on']} | {_test_cell(c)} |")
    for fold, table in tables.items():
        parts += ["", f"## Fold {fold}: trials", "", _markdown(table, list(flat), cfg.tune.metric)]
    return "\n".join(parts) + "\n"


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
