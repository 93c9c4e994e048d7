"""``serray ablate``: does the adapter with local attributes help, and by how much?

Arms (``ablate.arms``), each fine-tuned with the same recipe on the same folds, seeds and test
utterances:

* ``none``: no adapter, encoder features -> SAP (the baseline);
* ``random_init``: the same WAP-Transformer body, randomly initialised (separates "a Transformer on
  top" from "a pre-trained Transformer on top");
* ``no_local``: the adapter pre-trained without the local-attribute (k-means cluster) loss;
* ``full``: the adapter pre-trained with all three objectives;
* ``classical`` and ``oracle`` (reference arms, no neural network): logistic regression on
  utterance statistics of log-mel / MFCC frames, and on a synthetic corpus's own synthesis
  parameters (the ceiling); see :mod:`serray.train.baselines`.

Every arm runs under every mode of ``ablate.modes`` (``finetune``: the body is trained with the
head; ``frozen``: only SAP and the head learn) and label fraction of ``ablate.label_fractions``, for
``ablate.seeds`` seeds (``seed``, ``seed+1``, ...) on every fold of ``finetune.folds``. Work that arms
share is done once: one per-fold pre-training per seed serves every mode and fraction of its arm,
and the no-adapter and reference arms (which have no body) run once per fraction for all modes.

The unit of work is one (seed, fold): a Ray Tune trial that pre-trains that fold's two adapters and
fine-tunes every arm x mode x fraction, all resumable (a rerun reuses what is finished). The
driver then pairs the arms' test predictions: ``ablation.json`` (per-arm mean / sd / 95 % interval and
every run; paired comparisons full vs random_init, full vs no_local, random_init vs none, full vs
none, and full and random_init vs classical: a run-level sign-flip test, with an utterance bootstrap and a Wilcoxon
test over seed x fold beside it), ``ablation.md`` and
``ablation.png`` (:mod:`serray.train.ablation_report`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pandas as pd

from serray import storage
from serray.config import as_dict, derive
from serray.data.corpora import classes_of
from serray.train.results import ID_COLUMNS
from serray.train.tasks import get_task, scored_by, task_name, task_of

log = logging.getLogger(__name__)

ABLATION_DIR = "ablation"
NEURAL_ARMS = ("none", "random_init", "no_local", "full")
REFERENCE_ARMS = ("classical", "oracle")
BODYLESS_ARMS = ("none",) + REFERENCE_ARMS  # the mode changes nothing for them


def seeds_of(cfg) -> List[int]:
    """The seeds of the ablation: ``seed, seed+1, ..., seed+ablate.seeds-1``."""
    return [int(cfg.seed) + i for i in range(int(cfg.ablate.seeds))]


def _frac_name(f: float) -> str:
    return f"frac{f:g}"


def arm_overrides(cfg, arm: str, mode: str, fraction: float, seed: int) -> List[str]:
    """The config of one neural arm x mode x label fraction x seed run (its own directories; the
    pre-trainings are shared by every mode and fraction of an arm and seed)."""
    base = Path(cfg.output_dir) / ABLATION_DIR
    common = [f"seed={seed}", f"finetune.label_fraction={fraction}", "finetune.register=false"]
    if arm == "none":
        return common + ["finetune.mode=none", f"finetune.dir={base / 'none' / _frac_name(fraction) / f'seed{seed}'}"]
    run_dir = base / arm / mode / _frac_name(fraction) / f"seed{seed}"
    out = common + [f"finetune.mode={mode}", f"finetune.dir={run_dir}"]
    if arm == "random_init":
        return out + ["finetune.init=random"]
    if arm == "full" and seed == cfg.seed and mode == cfg.finetune.mode and fraction == 1.0:
        # the main run (`serray pipeline`): its folds are reused when the configs match
        out = common + [f"finetune.mode={mode}", f"finetune.dir={cfg.finetune.dir}"]
    out += ["finetune.init=pretrained", f"pretrain.dir={_pretrain_dir(cfg, arm, seed)}", "finetune.init_from=null"]
    if arm == "no_local":
        out.append("adapter.w_cluster=0.0")
    return out


def _pretrain_dir(cfg, arm: str, seed: int) -> str:
    """Under ``ablate.pretrain_dir`` when set (ablations of other fine-tuning recipes then share their
    pre-trainings); else the full arm of the configured seed shares ``pretrain.dir`` with
    ``serray pipeline`` (reused when the configs match) and every other (arm, seed) has its own."""
    if cfg.ablate.pretrain_dir:
        return str(Path(cfg.ablate.pretrain_dir) / arm / f"seed{seed}")
    if arm == "full" and seed == cfg.seed:
        return str(cfg.pretrain.dir)
    return str(Path(cfg.output_dir) / ABLATION_DIR / "pretrain" / arm / f"seed{seed}")


def arm_config(cfg, arm: str, mode: str, fraction: float, seed: int):
    return derive(cfg, arm_overrides(cfg, arm, mode, fraction, seed))


def _neural_runs(cfg) -> List[Tuple[str, str, float]]:
    """(arm, mode, fraction) of every neural run of one (seed, fold), bodyless arms once per fraction."""
    runs = []
    for arm in cfg.ablate.arms:
        if arm not in NEURAL_ARMS:
            continue
        for fraction in cfg.ablate.label_fractions:
            modes = [cfg.ablate.modes[0]] if arm in BODYLESS_ARMS else list(cfg.ablate.modes)
            runs += [(arm, mode, float(fraction)) for mode in modes]
    return runs


# ---------------------------------------------------------------- one unit: (seed, fold)


def run_unit(cfg, seed: int, fold: int, on_run: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Every neural run of one (seed, fold) (pre-training happens inside the first run that needs
    it, and is reused by the others); returns where each run's predictions are. ``on_run(i, info)``
    is called after each run."""
    from serray.train.finetune import fold_done, run_fold

    out = {}
    for i, (arm, mode, fraction) in enumerate(_neural_runs(cfg)):
        acfg = arm_config(cfg, arm, mode, fraction, seed)
        t0 = time.time()
        res = fold_done(acfg, fold) or run_fold(acfg, fold)
        metric, val_metric = _metrics(cfg)
        out[f"{arm}|{mode}|{fraction}"] = {metric: res[metric], "dir": str(Path(acfg.finetune.dir) / f"fold{fold}")}
        if on_run is not None:
            on_run(i, {"arm": ARMS_INDEX[arm], "mode": MODES_INDEX[mode], "fraction": fraction, "ua": res[metric],
                       "val_ua": res[val_metric], "seconds": time.time() - t0})
    return out


def _metrics(cfg) -> Tuple[str, str]:
    """``ablate.metric`` and the validation score of the selected epochs beside it (``ua``: ``val_ua``;
    a CCC metric: finetune.select_metric, by default ``val_ccc_mean``)."""
    metric = str(cfg.ablate.get("metric", "ua") or "ua")
    if metric == "ua":
        if task_name(cfg) == "dimensional":
            from serray.errors import ConfigError

            raise ConfigError("ablate.metric=ua needs a class head: a finetune.task=dimensional ablation compares "
                              "arms on ablate.metric=ccc_mean (or ccc_<dimension>)")
        return "ua", "val_ua"
    return metric, task_of(cfg).select_metric(cfg)


def _is_ccc(cfg) -> bool:
    return _metrics(cfg)[0] != "ua"


ARMS_INDEX = {a: i for i, a in enumerate(NEURAL_ARMS)}  # Tune results carry numbers only
MODES_INDEX = {"finetune": 0, "frozen": 1}


def _unit_trial(config: Dict[str, Any], cfg_dict: Dict[str, Any]) -> None:
    import ray.tune
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_dict)
    t0 = time.time()
    unit = _unit_arg(config)
    n = len(_neural_runs(cfg))
    run_unit(cfg, int(unit["seed"]), int(unit["fold"]),
             on_run=lambda i, info: ray.tune.report({**info, "run": i + 1, "runs": n}))
    ray.tune.report({"done": 1, "seconds": time.time() - t0})


def _fmt(v: float, metric: str) -> str:
    """UA in percent, CCC as it is."""
    return f"{100 * v:.1f}" if metric == "UA" else f"{v:.3f}"


class _Progress:
    """A Tune callback that prints one line per finished (seed, fold) unit, with an estimate of what is left."""

    def __new__(cls, total: int, echo: Callable[[str], Any], metric: str = "UA"):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self):
                self.done, self.t0 = 0, time.time()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "run" not in result:
                    return
                c = _unit_arg(trial.config)
                arm = NEURAL_ARMS[int(result["arm"])]
                mode = "frozen" if result["mode"] else "finetune"
                echo(f"[ablate] seed {c['seed']} fold {c['fold']}: run {int(result['run'])}/{int(result['runs'])} "
                     f"{arm} ({mode}, labels x{result['fraction']:g}) test {metric} {_fmt(result['ua'], metric)} "
                     f"(val {metric} {_fmt(result['val_ua'], metric)}) in {result['seconds']:.0f} s")

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                elapsed = time.time() - self.t0
                left = elapsed / self.done * (total - self.done)
                c = _unit_arg(trial.config)
                echo(f"[ablate] unit {self.done}/{total} done (seed {c['seed']}, fold {c['fold']}): "
                     f"{elapsed / 60:.1f} min elapsed, about {left / 60:.1f} min left")

            def on_trial_error(self, iteration, trials, trial, **info):
                c = _unit_arg(trial.config)
                echo(f"[ablate] unit seed {c['seed']}, fold {c['fold']} failed (rerun the same command to resume)")

        return Progress()


# ---------------------------------------------------------------- the driver


def run_ablation(cfg, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run (or resume) every unit, then pair the predictions and write ablation.json / .md / .png;
    tracked as one MLflow run with a child run per arm x mode x label fraction x seed."""
    from serray.tracking import Tracker, config_params, short_hash, stage_key

    tracker = Tracker.of(cfg)
    key = stage_key("ablation", short_hash(sorted(cfg.ablate.arms), sorted(cfg.ablate.modes), sorted(cfg.ablate.label_fractions),
                                           seeds_of(cfg), list(cfg.finetune.folds)), str(Path(cfg.output_dir) / ABLATION_DIR))
    with tracker.run(key, "ablation", tags={"stage": "ablation"}, params=config_params(cfg)) as run_id:
        ablation = _run_ablation(cfg, echo)
        _track_arms(tracker, run_id, ablation.pop("_predictions"))
        tracker.log_artifacts(run_id, [Path(cfg.output_dir) / ABLATION_DIR / f"ablation.{x}" for x in ("json", "md", "png")])
        return ablation


def _track_arms(tracker, parent: Optional[str], arm_preds: Dict[Tuple[str, str, float], pd.DataFrame]) -> None:
    """One MLflow run per arm x mode x label fraction x seed: its folds' test UA / WA / F1 (step = fold)
    and their means."""
    from serray.tracking import stage_key

    if not parent:
        return
    for (arm, mode, fraction), preds in sorted(arm_preds.items()):
        for seed, runs in preds.groupby("seed"):
            folds = {int(f): _run_scores(p) for f, p in runs.groupby("fold")}
            run_id = tracker.open_run(stage_key("arm", f"{arm}-{mode}-{fraction:g}-{seed}", parent), f"{arm} {mode} x{fraction:g} seed {seed}",
                                      parent=parent, tags={"arm": arm, "mode": mode, "label_fraction": fraction, "seed": seed},
                                      params={"arm": arm, "mode": mode, "label_fraction": fraction, "seed": seed})
            means = {f"test_{k}": sum(m[k] for m in folds.values()) / len(folds) for k in next(iter(folds.values()))}
            logged = tracker.metrics_of(run_id)
            if not all(k in logged and math.isclose(logged[k], v, rel_tol=1e-9, abs_tol=1e-12)
                       for k, v in means.items() if math.isfinite(v)):  # a rerun of a logged arm adds nothing
                for fold, m in folds.items():
                    tracker.log_metrics(run_id, {f"fold_test_{k}": v for k, v in m.items()}, step=fold)
                tracker.log_metrics(run_id, means)
            tracker.finish(run_id)


def _run_scores(preds: pd.DataFrame) -> Dict[str, float]:
    """One run's test scores from its predictions: UA / WA / macro-F1 (``label``, ``pred``) or, for a
    CCC ablation, CCC / r / MAE per dimension (``<dim>``, ``pred_<dim>``)."""
    return get_task("categorical" if "label" in preds.columns else "dimensional").run_scores(preds)


def _run_ablation(cfg, echo: Callable[[str], Any]) -> Dict[str, Any]:
    import ray.tune as tune

    from serray.data.features.featurize import featurize
    from serray.data.prepare import prepare_corpus
    from serray.ray_utils import init_ray
    from serray.train.finetune import _tune_storage, protocol, trial_resources
    from serray.data.features.featurize import check_features

    t0 = time.time()
    seeds, folds = seeds_of(cfg), list(cfg.finetune.folds)
    from serray.data.prepare import makes_synthetic

    made_here = makes_synthetic(cfg)  # the corpus, with its oracle, is made below
    if "oracle" in cfg.ablate.arms and not made_here:
        _oracle_file(cfg)  # a clear error before any work when there is none
    if not storage.is_file(storage.join(cfg.features.dir, "_serray_features.json")):
        prepare_corpus(cfg, echo)
        featurize(cfg)
    if "oracle" in cfg.ablate.arms and made_here:
        _oracle_file(cfg)
    check_features(cfg)
    runs = _neural_runs(cfg)
    units = [(s, f) for s in seeds for f in folds]
    name = "UA" if not _is_ccc(cfg) else _metrics(cfg)[0]
    echo(f"[ablate] arms {list(cfg.ablate.arms)} x modes {list(cfg.ablate.modes)} x label fractions "
         f"{list(cfg.ablate.label_fractions)}; seeds {seeds} x folds {folds} = {len(units)} units of "
         f"{len(runs)} fine-tuning runs each; protocol {protocol(cfg)}")
    if runs:
        init_ray(cfg)
        trainable = tune.with_resources(tune.with_parameters(_unit_trial, cfg_dict=as_dict(cfg)), trial_resources(cfg))
        tuner = tune.Tuner(
            trainable,
            param_space={"unit": tune.grid_search([{"seed": s, "fold": f} for s, f in units])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.ablate.max_concurrent),
            run_config=tune.RunConfig(**_tune_storage(str(Path(cfg.output_dir) / ABLATION_DIR / "tune")),
                                      name=f"units-{int(time.time())}", verbose=0,
                                      callbacks=[_Progress(len(units), echo, name)]),
        )
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise errors[0]
    arm_preds, arm_val = _collect(cfg, seeds, folds)
    metric = _metrics(cfg)[0]
    scoring = scored_by(metric)  # ua: the four-class run-level statistics; ccc_*: the same ones on CCC
    if not _is_ccc(cfg):  # the reference arms (classical, oracle) are scored on UA only
        refs, ref_val = _reference_arms(cfg, seeds, folds, echo)
        arm_preds.update(refs)
        arm_val.update(ref_val)
    ablation = scoring.build_ablation(arm_preds, protocol(cfg), folds, seeds, metric, list(cfg.finetune.dimensions),
                                      n_boot=cfg.ablate.bootstrap, boot_seed=cfg.seed, arm_val=arm_val,
                                      classes=classes_of(cfg))
    ablation.update({"encoder": cfg.encoder.name, **scoring.ablation_record(cfg), "arms_config": list(cfg.ablate.arms),
                     "modes": list(cfg.ablate.modes), "label_fractions": list(cfg.ablate.label_fractions),
                     "seconds": round(time.time() - t0, 1)})
    paths = scoring.write_ablation(ablation, Path(cfg.output_dir) / ABLATION_DIR)  # json, md (and png on UA)
    echo(paths["md"].read_text())
    files = [str(p) for p in paths.values()]
    echo(f"ablation written to {', '.join(files[:-1])} and {files[-1]} in {(time.time() - t0) / 60:.1f} min")
    return {**ablation, "_predictions": arm_preds}


def _unit_arg(config):  # Tune passes {"unit": {...}}
    return config.get("unit", config)


def _collect(cfg, seeds: List[int], folds: List[int]):
    """The test predictions of every neural run, as ``{(arm, mode, fraction): frame}`` (bodyless arms
    are listed under every mode, with the same runs), and the selected epochs' validation UA,
    ``{(arm, mode, fraction): {(seed, fold): val_ua}}``."""
    from serray.errors import SerrayError
    from serray.train.finetune import fold_done

    runs = [(arm, mode, fraction, seed, fold) for arm, mode, fraction in _neural_runs(cfg) for seed in seeds
            for fold in folds]
    missing = [r for r in runs if fold_done(arm_config(cfg, *r[:4]), r[4]) is None]
    if missing:  # an interrupted sweep (Ctrl-C, a lost node) or a failed unit: say so, keep what is finished
        arm, mode, fraction, seed, fold = missing[0]
        raise SerrayError(f"the ablation is incomplete: {len(missing)} of {len(runs)} fine-tuning runs have no "
                          f"result (the first: {arm}, {mode}, labels x{fraction:g}, seed {seed}, fold {fold}); the "
                          "sweep was interrupted or a unit failed. Rerun the same command: finished runs are kept.")
    _, val_metric = _metrics(cfg)
    columns = scored_by(_metrics(cfg)[0]).prediction_columns(cfg)
    out: Dict[Tuple[str, str, float], pd.DataFrame] = {}
    val: Dict[Tuple[str, str, float], Dict[Tuple[int, int], float]] = {}
    for arm, mode, fraction in _neural_runs(cfg):
        frames, vals = [], {}
        for seed in seeds:
            acfg = arm_config(cfg, arm, mode, fraction, seed)
            for fold in folds:
                p = pd.read_csv(Path(acfg.finetune.dir) / f"fold{fold}" / "predictions.csv", dtype=ID_COLUMNS)
                frames.append(p.assign(seed=seed, fold=fold)[["seed", "fold", "utt_id", *columns]])
                vals[(seed, fold)] = float(fold_done(acfg, fold)[val_metric])
        preds = pd.concat(frames, ignore_index=True)
        for m in (cfg.ablate.modes if arm in BODYLESS_ARMS else [mode]):
            out[(arm, m, fraction)] = preds
            val[(arm, m, fraction)] = vals
    return out, val


def _oracle_file(cfg) -> str:
    from serray.errors import ConfigError

    path = cfg.ablate.oracle_file or str(Path(cfg.data.root).parent / "synthetic_oracle.csv")
    if not Path(path).is_file():
        raise ConfigError(f"arm oracle needs the synthesis parameters of a synthetic corpus: {path} does not exist "
                          "(set ablate.oracle_file, or drop oracle from ablate.arms for a real corpus)")
    return path


def reference_dir(output_dir, arm: str, fraction: float, seed: int) -> str:
    """Where a reference arm's runs of one label fraction and seed are written, one ``fold<k>/`` each
    (``predictions.csv``: the test utterances' labels and predictions; ``reference.json``: the recipe
    chosen on the training sessions and its cross-validated UA), beside the neural arms' run
    directories, so that studies can pair them with other directories' runs utterance by utterance."""
    return storage.join(str(output_dir), ABLATION_DIR, arm, _frac_name(fraction), f"seed{seed}")


def _write_reference_run(fold_dir: str, preds: pd.DataFrame, record: Dict[str, Any]) -> None:
    import json

    storage.write_text(storage.join(fold_dir, "predictions.csv"), preds[["utt_id", "label", "pred"]].to_csv(index=False))
    storage.write_text(storage.join(fold_dir, "reference.json"), json.dumps(record, indent=1))


def _reference_arms(cfg, seeds: List[int], folds: List[int], echo):
    """Predictions of the classical and oracle arms (logistic regression, same folds, seeds, splits and
    label fractions as the neural arms, trained on the training split), each with its recipe (feature
    subset and regularisation) chosen per fold by a leave-one-session-out cross-validation over the
    fold's training sessions (:func:`serray.train.baselines.choose_recipe`; never the test session); and the
    chosen recipes' cross-validated UA, ``{(arm, mode, fraction): {(seed, fold): val_ua}}``."""
    import numpy as np

    from serray.data.corpora import classes_of
    from serray.train.folds import fold_split, labelled_rows

    arms = [a for a in cfg.ablate.arms if a in REFERENCE_ARMS]
    if not arms:
        return {}, {}
    from serray.train import baselines
    from serray.data.corpora.base import read_manifest

    rows = labelled_rows(cfg)
    labels = list(classes_of(cfg))  # data.classes, in index order
    feats, recipes = {}, {}
    if "classical" in arms:
        manifest = read_manifest(cfg.data.manifest).set_index("utt_id")
        paths = manifest.loc[rows["utt_id"], "path"].tolist()
        kind = str(cfg.ablate.classical_features)
        if kind == "stats":
            echo(f"[ablate] classical baseline: utterance statistics of log-mel / MFCC frames of {len(rows)} utterances")
            x = baselines.classical_features(paths, cfg.encoder.sample_rate)
            recipes["classical"] = baselines.classical_recipes()
        else:
            from serray.data.features.opensmile import functionals

            echo(f"[ablate] classical baseline: openSMILE {kind} functionals of {len(rows)} utterances")
            x = functionals(paths, kind, cfg.encoder.sample_rate)
            recipes["classical"] = None  # the whole feature set; only the regularisation is chosen
        feats["classical"] = pd.DataFrame(np.asarray(x), index=rows["utt_id"])
    if "oracle" in arms:
        x = baselines.oracle_features(_oracle_file(cfg), rows["utt_id"].tolist())
        feats["oracle"] = pd.DataFrame(np.asarray(x), index=rows["utt_id"])
        recipes["oracle"] = None
    out, val, chosen = {}, {}, []
    for arm in arms:
        for fraction in cfg.ablate.label_fractions:
            frames, vals = [], {}
            for seed in seeds:
                scfg = derive(cfg, [f"seed={seed}", f"finetune.label_fraction={fraction}"])
                for fold in folds:
                    split = fold_split(scfg, fold)
                    pool = pd.concat([split["train"], split["val"]])  # the training sessions' labelled rows
                    choice = baselines.choose_recipe(feats[arm].loc[pool["utt_id"]].to_numpy(),
                                                     np.array([labels.index(l) for l in pool["label"]]),
                                                     pool["session"].to_numpy(), columns=recipes[arm], seed=seed)
                    cols = (recipes[arm] or {"all": slice(None)})[choice["columns"]]
                    pred, _ = baselines.fit_predict(feats[arm].loc[split["train"]["utt_id"]].to_numpy()[:, cols],
                                                    np.array([labels.index(l) for l in split["train"]["label"]]),
                                                    feats[arm].loc[split["test"]["utt_id"]].to_numpy()[:, cols], seed,
                                                    C=choice["C"])
                    vals[(seed, fold)] = choice["val_ua"]
                    chosen.append(f"{choice['columns']}/C={choice['C']:g}")
                    frame = pd.DataFrame({"seed": seed, "fold": fold, "utt_id": split["test"]["utt_id"].to_numpy(),
                                          "label": split["test"]["label"].to_numpy(),
                                          "pred": [labels[i] for i in pred]})
                    _write_reference_run(storage.join(reference_dir(cfg.output_dir, arm, float(fraction), seed), f"fold{fold}"), frame,
                                         {"arm": arm, "seed": seed, "fold": fold, "label_fraction": float(fraction),
                                          "val_ua": float(choice["val_ua"]), "C": float(choice["C"]), "columns": str(choice["columns"]),
                                          "features": str(cfg.ablate.classical_features) if arm == "classical"
                                          else "synthesis parameters"})
                    frames.append(frame)
            preds = pd.concat(frames, ignore_index=True)
            for mode in cfg.ablate.modes:
                out[(arm, mode, float(fraction))] = preds
                val[(arm, mode, float(fraction))] = vals
    if chosen:
        from collections import Counter

        echo("[ablate] reference recipes chosen by cross-validation over the training sessions: "
             + ", ".join(f"{k} x{n}" for k, n in sorted(Counter(chosen).items())))
    return out, val
