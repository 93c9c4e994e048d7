"""Ray Tune sweeps (``serray.tune``): search-space validation, a tiny sweep, resume, the registry."""

from __future__ import annotations

from pathlib import Path

import json

import pandas as pd
import pytest

from serray.config import load_config
from serray.errors import ConfigError, SerrayError
from serray.train.registry import list_entries
from serray.tune import best_trial, flatten_space, validate_space

TINY = ["pretrain.epochs=1", "finetune.epochs=3", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=32", "finetune.max_failures=0",
        "tune.folds=[1,2]", "tune.grace_period=2", "tune.max_concurrent_trials=2", "tune.num_samples=1"]


def _space_file(tmp_path: Path, space: str) -> Path:
    f = tmp_path / "sweep.yaml"
    f.write_text("tune:\n  search_space:\n" + space)
    return f


def _cfg(featurized, tmp_path, space: str, *overrides):
    return load_config(_space_file(tmp_path, space),
                       [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "encoder.name=fbank", "ray.progress_bars=false",
                        f"features.dir={featurized.features.dir}", f"data.manifest={featurized.data.manifest}",
                        *TINY, *overrides])


def test_flatten_nested_and_forms():
    flat = flatten_space({"adapter": {"mask_ratio": {"uniform": [0.2, 0.6]}, "num_clusters": {"grid": [4, 8]}},
                          "finetune": {"lr": {"loguniform": [1e-4, 1e-2]}}})
    assert flat == {"adapter.mask_ratio": ("uniform", [0.2, 0.6]), "adapter.num_clusters": ("grid", [4, 8]),
                    "finetune.lr": ("loguniform", [1e-4, 1e-2])}


def test_discrete_spaces_are_enumerated_without_replacement():
    from serray.tune import enumerate_space

    cfg = load_config()
    flat = flatten_space(dict(cfg.tune.search_space))  # 3 x 2 x 2 choices
    four = enumerate_space(flat, 4, seed=0)
    assert len(four) == 4 and len({tuple(sorted(c.items())) for c in four}) == 4
    everything = enumerate_space(flat, 50, seed=0)
    assert len(everything) == 12 and len({tuple(sorted(c.items())) for c in everything}) == 12
    assert enumerate_space(flat, 4, seed=0) == four  # reproducible
    grid = {"a.x": ("grid", [1, 2]), "a.y": ("choice", [3, 4, 5])}
    runs = enumerate_space(grid, 2, seed=1)
    assert sorted(r["a.x"] for r in runs) == [1, 1, 2, 2]  # every grid point, num_samples distinct draws each
    assert all(len({r["a.y"] for r in runs if r["a.x"] == x}) == 2 for x in (1, 2))
    assert len(enumerate_space({"a.x": ("grid", [1, 2])}, 3, seed=0)) == 2  # never a configuration twice


def test_a_test_metric_as_the_objective_is_a_config_error():
    with pytest.raises(ConfigError, match="tune.metric=ua is a test metric"):
        load_config(None, ["tune.metric=ua"])
    assert load_config().tune.metric == "val_ua"


def _fake_result(trial_id, val_ua, val_sessions, hyper):
    from types import SimpleNamespace

    return SimpleNamespace(metrics={"val_ua": val_ua, "val_loss": 1 - val_ua, "done_trial": 1, "trial_id": trial_id,
                                    "trial_dir": f"/x/{trial_id}", "val_sessions": json.dumps(val_sessions)},
                           config={"combo": hyper}, error=None, path=f"/x/{trial_id}")


def test_a_nested_sweep_chooses_each_folds_configuration_on_that_folds_validation_speakers(tmp_path, monkeypatch):
    """Trial a is the best on fold 1's validation speakers, trial b on fold 2's. The old sweep ranked
    every trial on tune.folds=[1] and tested fold 2 with a, chosen partly on session 2's speakers (fold
    1's validation speakers come from sessions 2-5). Now fold 2 gets b, chosen on sessions 1, 3-5 only,
    and every fold's test split is scored once, for its own choice."""
    import serray.tune as st

    cfg = load_config(None, [f"output_dir={tmp_path}", "tune.folds=[1,2]"])
    hyper = {"a": {"adapter.mask_ratio": 0.3}, "b": {"adapter.mask_ratio": 0.6}}
    val = {1: {"a": 0.80, "b": 0.40}, 2: {"a": 0.30, "b": 0.70}}
    sessions = {1: [2, 4], 2: [1, 3]}  # validation speakers' sessions of each fold's trials
    tested = []

    def fake_fit(cfg_, flat, folds, echo):
        (fold,) = folds
        grid = [_fake_result(t, val[fold][t], sessions[fold], hyper[t]) for t in ("a", "b")]
        return grid, Path(cfg_.tune.dir) / cfg_.tune.name / f"fold{fold}"

    def fake_test(tcfg, fold):
        tested.append((fold, tcfg.adapter.mask_ratio))
        return {"fold": fold, "ua": 0.5, "val_ua": val[fold]["a" if tcfg.adapter.mask_ratio == 0.3 else "b"]}

    finished = {}
    monkeypatch.setattr(st, "_fit", fake_fit)
    monkeypatch.setattr("serray.train.finetune.test_fold", fake_test)
    monkeypatch.setattr("serray.train.finetune.fold_done", lambda *a: None)
    monkeypatch.setattr(st, "_copy_fold", lambda *a: None)
    monkeypatch.setattr(st, "_finish_nested", lambda cfg_, flat, results, choices, final_dir, echo: finished.update(choices))
    flat = {"adapter.mask_ratio": ("choice", [0.3, 0.6])}
    st._nested(cfg, flat, echo=lambda *_: None)
    assert tested == [(1, 0.3), (2, 0.6)]  # once per fold, each with its own choice
    assert {f: c["trial_id"] for f, c in finished.items()} == {1: "a", 2: "b"}
    assert finished[2]["ranked_on"] == "fold 2's validation speakers (sessions [1, 3])"
    md = (Path(cfg.tune.dir) / cfg.tune.name / "trials.md").read_text()
    assert "nested selection" in md and "| 2 | b | 0.6 | 0.7000 |" in md


def test_the_nested_guard_refuses_a_choice_ranked_on_the_test_session():
    from serray.tune import check_nested

    check_nested(2, {"trial_id": "t", "val_sessions": "[1, 3, 4]"})
    with pytest.raises(AssertionError, match="leakage: fold 2's configuration was ranked on validation speakers"):
        check_nested(2, {"trial_id": "t", "val_sessions": "[1, 2]"})


def test_asha_runs_in_its_own_metrics_direction():
    """The scheduler took tune.mode for tune.scheduler_metric: tune.metric=val_loss, tune.mode=min made
    ASHA minimise validation UA and stop the best trials."""
    from serray.tune import _scheduler, objective_mode

    cfg = load_config(None, ["tune.metric=val_loss"])
    assert objective_mode(cfg) == "min"
    asha = _scheduler(cfg, [1])
    assert (asha._metric, asha._mode) == ("val_ua", "max")
    asha = _scheduler(load_config(None, ["tune.metric=val_loss", "tune.scheduler_metric=val_loss"]), [1])
    assert (asha._metric, asha._mode) == ("val_loss", "min")
    assert _scheduler(load_config(None, ["tune.metric=val_loss", "tune.mode=min"]), [1])._mode == "max"


@pytest.mark.parametrize("override, needle", [
    ("tune.scheduler_metric=val_accuracy", "tune.scheduler_metric=val_accuracy is not reported by the fine-tuning epochs"),
    ("tune.scheduler_metric=ua", "tune.scheduler_metric=ua is not reported"),
    ("tune.mode=max tune.metric=val_loss", "tune.mode=max contradicts tune.metric=val_loss"),
    ("tune.num_samples=-1", "tune.num_samples must be >= 1, got -1"),
    ("tune.reduction_factor=1", "tune.reduction_factor must be >= 2, got 1"),
    ("tune.grace_period=0", "tune.grace_period must be >= 1, got 0"),
    ("tune.selection=sometimes", "tune.selection must be nested or non_nested"),
    ("tune.final_folds=[1,2]", "tune.final_folds applies to tune.selection=non_nested only"),
    ("tune.folds=[7]", "tune.folds must be null or a non-empty subset of data.sessions"),
])
def test_every_tune_key_is_checked_when_the_config_loads(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert needle in str(e.value) and str(e.value).count("\n") == 0


def test_a_non_nested_sweep_is_labelled_as_such_end_to_end(tmp_path, monkeypatch):
    import serray.tune as st

    cfg = load_config(None, [f"output_dir={tmp_path}", "tune.selection=non_nested", "tune.folds=[1]",
                             "tune.final_folds=[1,2]"])
    monkeypatch.setattr(st, "validate_space", lambda c: {"adapter.mask_ratio": ("choice", [0.3, 0.6])})
    monkeypatch.setattr("serray.data.features.featurize.check_features", lambda c: {})
    monkeypatch.setattr("serray.ray_utils.init_ray", lambda c: None)
    monkeypatch.setattr(st.storage, "is_file", lambda p: True)
    grid = [_fake_result("a", 0.8, [2, 3], {"adapter.mask_ratio": 0.3}),
            _fake_result("b", 0.4, [2, 3], {"adapter.mask_ratio": 0.6})]
    monkeypatch.setattr(st, "_fit", lambda c, flat, folds, echo: (grid, Path(c.tune.dir) / c.tune.name / "trials"))
    seen = {}

    def fake_finetune(fcfg, extra=None, selection="fixed", hyperparameters=None, selected_on=None):
        seen.update(extra=extra, selection=selection, folds=list(fcfg.finetune.folds), selected_on=selected_on)
        fold = {"fold": 1, "n_test": 10, "ua": 0.5, "wa": 0.5, "macro_f1": 0.5}
        return {"folds": [fold, {**fold, "fold": 2}], "mean": {"ua": 0.5, "wa": 0.5, "macro_f1": 0.5},
                "std": {"ua": 0.0, "wa": 0.0, "macro_f1": 0.0}, "registered": "entry-1"}

    monkeypatch.setattr("serray.train.finetune.run_finetune", fake_finetune)
    out = st.run_sweep(cfg, echo=lambda *_: None)
    assert out["best"]["trial_id"] == "a" and seen["selection"] == "non-nested" and seen["folds"] == [1, 2]
    assert seen["extra"]["selection"]["mode"] == "non-nested" and "NON-NESTED" in seen["selected_on"]
    assert "NON-NESTED" in (Path(cfg.tune.dir) / cfg.tune.name / "trials.md").read_text()


def test_a_file_search_space_replaces_the_default(tmp_path):
    cfg = load_config(_space_file(tmp_path, "    finetune:\n      lr: {choice: [0.001]}\n"))
    assert flatten_space(dict(cfg.tune.search_space)) == {"finetune.lr": ("choice", [0.001])}


@pytest.mark.parametrize("space, needle", [
    ("    adapter:\n      mask_ration: {choice: [0.3]}\n", "unknown config key 'adapter.mask_ration' (did you mean 'adapter.mask_ratio'?)"),
    ("    adapter:\n      mask_ratio: {unifrom: [0.1, 0.5]}\n", "unknown distribution form 'unifrom'"),
    ("    adapter:\n      mask_ratio: {uniform: [0.5, 0.1]}\n", "low < high"),
    ("    adapter:\n      mask_ratio: {choice: [0.3, 1.5]}\n", "adapter.mask_ratio must be in [0, 1)"),
    ("    adapter:\n      mask_ratio: 0.3\n", "a leaf must be one form"),
    ("    {}\n", "tune.search_space is empty"),
])
def test_bad_search_space_is_a_clear_error_before_any_trial(tmp_path, space, needle):
    cfg = load_config(_space_file(tmp_path, space), [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        validate_space(cfg)
    assert needle in str(e.value)


def test_cli_misspelt_search_space_key_exits_2(tmp_path, capsys):
    from serray.cli import main

    rc = main(["tune", f"output_dir={tmp_path}", "tune.search_space.adapter.num_cluster.choice=[4]"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown config key 'adapter.num_cluster'" in err
    assert not (tmp_path / "tune").exists()  # nothing started


SPACE = ("    adapter:\n      mask_ratio: {grid: [0.3, 0.6]}\n"
         "    finetune:\n      fail_at_step: {grid: [null, 2]}\n")


@pytest.fixture(scope="module")
def sweep(featurized, tmp_path_factory, mlflow_server):
    """A nested sweep on folds 1 and 2, 4 trials each; the two with finetune.fail_at_step=2 crash once per
    fold (max_failures=0): the sweep is interrupted, and rerunning the same command resumes it. Tracked
    on a real MLflow server (experiment ``sweep-test``)."""
    from serray.tune import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = _cfg(featurized, tmp, SPACE, f"tracking.uri={mlflow_server}", "tracking.experiment=sweep-test")
    failures = []
    for _ in range(3):  # fold 1's crashes stop the first run, fold 2's the second
        try:
            out = run_sweep(cfg, echo=lambda *_: None)
            break
        except SerrayError as e:
            assert "rerun the same command" in str(e)
            failures.append((str(e), list_entries(cfg.registry.dir)))
    first = pd.read_csv(Path(cfg.tune.dir) / cfg.tune.name / "fold1" / "trials.csv")
    return cfg, failures, out, first


def _attempts(trial_dir) -> int:
    return len((Path(trial_dir) / "attempts.log").read_text().splitlines())


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.sweep
def test_an_interrupted_nested_sweep_resumes_tests_each_fold_once_and_registers(sweep):
    cfg, failures, out, _ = sweep
    assert len(failures) == 2 and all(entries == [] for _, entries in failures)  # nothing registered until whole
    root = Path(cfg.tune.dir) / cfg.tune.name
    (entry,) = list_entries(cfg.registry.dir)
    assert entry["folds"] == [1, 2] and entry["protocol"] == "inductive" and entry["selection"] == "nested"
    assert entry["source"] == "tune" and "nested" in entry["selected_on"]
    assert set(entry["per_fold"]) == {"1", "2"}
    final = json.loads((root / "final" / "finetune" / "metrics.json").read_text())
    assert entry["metrics"]["ua"] == pytest.approx(final["mean"]["ua"])
    assert final["selection"]["mode"] == "nested" and set(final["selection"]["per_fold"]) == {"1", "2"}
    for fold in (1, 2):
        choice = out["choices"][fold]
        table = pd.read_csv(root / f"fold{fold}" / "trials.csv")
        finished = table[table["status"] == "finished"]
        assert choice["trial_id"] == best_trial(finished, "val_ua", "max")["trial_id"]
        assert all(fold not in json.loads(v) for v in finished["val_sessions"])
        res = json.loads((root / "final" / "finetune" / f"fold{fold}" / "fold_result.json").read_text())
        assert res["test_evaluations"] == 1 and res["fold"] == fold
        # no trial scored a test split: only the chosen one has a fold result, written by the final test
        scored = sorted(p.parents[2].name for p in (root / f"fold{fold}" / "trials").glob(
            f"*/finetune/fold{fold}/fold_result.json"))
        assert scored == [choice["trial_id"]]
    reg_cfg = load_config(Path(entry["path"]) / "config.yaml")
    assert reg_cfg.finetune.fail_at_step is None
    assert "nested selection" in (root / "trials.md").read_text()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.sweep
def test_a_resumed_sweep_does_not_rerun_finished_trials_and_shares_pretraining(sweep):
    cfg, _, _, first = sweep
    root = Path(cfg.tune.dir) / cfg.tune.name
    assert len(first) == 4
    for fold in (1, 2):
        table = pd.read_csv(root / f"fold{fold}" / "trials.csv")
        assert len(table) == 4 and not (table["status"] == "ERROR").any()
        for _, row in table.iterrows():
            crashed = row["finetune.fail_at_step"] == 2
            assert _attempts(root / f"fold{fold}" / "trials" / row["trial_id"]) == (2 if crashed else 1), row["trial_id"]
        for f in ("trials.csv", "sweep.png"):
            assert (root / f"fold{fold}" / f).stat().st_size > 0
    # trials with the same pre-training settings share one pre-training: 2 mask ratios x 2 folds
    assert len(list((root / "pretrain").glob("*/fold*/adapter/meta.json"))) == 4


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.sweep
def test_the_sweep_is_tracked_one_run_per_trial_continued_on_resume(sweep, mlflow_server):
    """The sweep's MLflow run holds one child run per Tune trial (MLflowLoggerCallback) with its swept
    values and results, a crashed-then-resumed trial continuing its own run, and the final run."""
    from mlflow import MlflowClient

    cfg, failures, out, _ = sweep
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id], max_results=1000)
    stage = {s: [r for r in runs if r.data.tags.get("stage") == s] for s in ("sweep", "trial", "final")}
    assert sum(map(len, stage.values())) == len(runs)
    (sweep_run,) = stage["sweep"]  # the interrupted runs and the resume are one run
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.params["adapter.mask_ratio"] == "0.5"  # the base config; the swept space beside it
    assert sweep_run.data.params["space.adapter.mask_ratio"] == "grid [0.3, 0.6]"
    trials = stage["trial"]
    assert len(trials) == 8 and len({r.data.tags["trial_id"] + r.data.tags["experiment"] for r in trials}) == 8
    root = Path(cfg.tune.dir) / cfg.tune.name
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id and r.info.status == "FINISHED"
        assert r.data.params["adapter.mask_ratio"] in ("0.3", "0.6")
        fold = int(r.data.tags["experiment"][len("fold"):])
        table = pd.read_csv(root / f"fold{fold}" / "trials.csv").set_index("trial_id")
        row = table.loc[r.data.tags["trial_id"]]
        assert r.data.metrics["val_ua"] == pytest.approx(row["val_ua"])
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_ua")]
        if row["finetune.fail_at_step"] == 2:  # crashed in its first attempt, resumed by the rerun: one run
            assert _attempts(root / f"fold{fold}" / "trials" / row.name) == 2 and steps[-1] >= 1, steps
    (final,) = stage["final"]
    assert final.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
    assert final.data.metrics["test_ua"] == pytest.approx(out["final"]["mean"]["ua"])
    assert final.data.params["fold1.trial_id"] == out["choices"][1]["trial_id"]
    assert {a.path for a in client.list_artifacts(final.info.run_id)} >= {"metrics.json", "results.md", "trials.md"}
    (entry,) = list_entries(cfg.registry.dir)
    assert entry["mlflow_run_id"] == final.info.run_id


def _fake_grid(rows):
    """A stand-in for Tune's ResultGrid: (trial_id, tune status, metrics, error) per trial."""
    from types import SimpleNamespace

    results = [SimpleNamespace(metrics=m, config={"combo": {"adapter.mask_ratio": 0.3 + 0.1 * i}}, error=e,
                               path=f"/x/_trial_{tid}") for i, (tid, _, m, e) in enumerate(rows)]

    class Grid(list):
        pass

    grid = Grid(results)
    grid._experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(trial_id=tid, status=st) for tid, st, _, _ in rows])
    return grid


def test_an_interrupted_experiment_chooses_nothing(tmp_path):
    from serray.tune import _finished_best, trial_table

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    exp = Path(cfg.tune.dir) / cfg.tune.name / "fold1"
    done = {"val_ua": 0.5, "done_trial": 1, "trial_id": "t0", "trial_dir": "/x", "val_sessions": "[2]"}
    grid = _fake_grid([("t0", "TERMINATED", done, None),
                       ("t1", "TERMINATED", {"val_ua": 0.2, "trial_id": "t1"}, None),   # ASHA stopped it
                       ("t2", "PENDING", {"val_ua": 0.4, "trial_id": "t2"}, None)])     # Ctrl-C while running
    flat = {"adapter.mask_ratio": ("choice", [0.3, 0.4, 0.5])}
    table = trial_table(cfg, grid, flat, exp)
    assert list(table["status"]) == ["finished", "stopped early", "interrupted"]
    with pytest.raises(SerrayError, match="interrupted with 1 trial.*rerun the same command"):
        _finished_best(cfg, grid, table, exp)
    assert list(pd.read_csv(exp / "trials.csv")["status"]) == ["finished", "stopped early", "interrupted"]


def test_best_trial_breaks_ties_by_trial_id_not_by_finishing_order():
    """The sweep fixture's four trials all reached val_ua 0.4167; the best was the first row of a
    table in finishing order, so the interrupted run and its resumed run registered different trials
    (and the final run was redone with other hyper-parameters)."""
    import itertools

    rows = [{"trial_id": "ab_00002", "val_ua": 0.4167, "m": 0.6}, {"trial_id": "ab_00000", "val_ua": 0.4167, "m": 0.3},
            {"trial_id": "ab_00003", "val_ua": 0.25, "m": 0.6}, {"trial_id": "ab_00001", "val_ua": 0.4167, "m": 0.3}]
    for perm in itertools.permutations(rows):
        assert best_trial(pd.DataFrame(list(perm)), "val_ua", "max")["trial_id"] == "ab_00000"
        assert best_trial(pd.DataFrame(list(perm)), "val_ua", "min")["trial_id"] == "ab_00003"


def test_trial_ties_are_broken_by_a_proper_score_before_the_trial_id():
    """Three trials tie on validation UA; the one whose validation predictions have the lowest
    class-balanced cross-entropy wins, whatever its place in the search space (the trial id decides only
    when that ties too)."""
    import itertools

    rows = [{"trial_id": "ab_00000", "val_ua": 0.5, "val_bal_loss": 1.20, "val_loss": 1.0},
            {"trial_id": "ab_00001", "val_ua": 0.5, "val_bal_loss": 0.95, "val_loss": 1.1},
            {"trial_id": "ab_00002", "val_ua": 0.5, "val_bal_loss": 0.95, "val_loss": 1.2},
            {"trial_id": "ab_00003", "val_ua": 0.4, "val_bal_loss": 0.50, "val_loss": 0.5}]
    for perm in itertools.permutations(rows):
        assert best_trial(pd.DataFrame(list(perm)), "val_ua", "max")["trial_id"] == "ab_00001"
    # a table without the proper score (a sweep recorded before it existed): the plain loss, then the id
    old = pd.DataFrame([{k: v for k, v in r.items() if k != "val_bal_loss"} for r in rows])
    assert best_trial(old, "val_ua", "max")["trial_id"] == "ab_00000"


def test_a_sweep_name_is_resumed_only_by_its_own_config(tmp_path):
    """`serray tune` then `serray tune finetune.task=dimensional` in the same output_dir (both documented)
    reused the sweep `sweep` and failed after its trials with "no readable selected model"; now the second
    is refused before any trial runs, naming what differs."""
    import json

    from serray.config import load_config
    from serray.errors import ConfigError
    from serray.tune import SPACE_FILE, check_same_sweep, sweep_key, validate_space

    def key(*overrides):
        cfg = load_config(None, [f"output_dir={tmp_path}", *overrides])
        return cfg, sweep_key(cfg, validate_space(cfg))

    root = tmp_path / "tune" / "sweep"
    root.mkdir(parents=True)
    cfg, first = key()
    check_same_sweep(cfg, root, first)  # nothing stored yet
    (root / SPACE_FILE).write_text(json.dumps(first))
    cfg2, k2 = key("tracking.enabled=false", "tune.max_concurrent_trials=1")
    check_same_sweep(cfg2, root, k2)  # where it runs and how it is logged may change
    cfg3, k3 = key("finetune.task=dimensional")
    with pytest.raises(ConfigError, match=r"finetune.task: 'categorical' -> 'dimensional'.*tune.name=sweep-2"):
        check_same_sweep(cfg3, root, k3)
    cfg4, k4 = key("tune.folds=[1,2]")
    with pytest.raises(ConfigError, match="another search space, selection or folds"):
        check_same_sweep(cfg4, root, k4)
