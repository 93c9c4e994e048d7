"""Ray Tune sweeps (``serray.tune``): search-space validation, a tiny sweep, resume, the registry."""

from __future__ import annotations

from pathlib import Path

import json

import pandas as pd
import pytest

from serray.config import load_config
from serray.errors import ConfigError, SerrayError
from serray.registry import list_entries
from serray.tune import best_trial, flatten_space, validate_space

TINY = ["pretrain.epochs=1", "finetune.epochs=3", "adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_layers=1",
        "adapter.num_clusters=4", "finetune.attention_dim=16", "finetune.hidden_dim=32", "finetune.max_failures=0",
        "tune.folds=[1]", "tune.final_folds=[1,2]", "tune.grace_period=2", "tune.max_concurrent_trials=2",
        "tune.num_samples=1"]


def _space_file(tmp_path: Path, space: str) -> Path:
    f = tmp_path / "sweep.yaml"
    f.write_text("tune:\n  search_space:\n" + space)
    return f


def _cfg(featurized, tmp_path, space: str, *overrides):
    return load_config(_space_file(tmp_path, space),
                       [f"output_dir={tmp_path}", f"data.root={featurized.data.root}", "ray.progress_bars=false",
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


def test_the_sweep_chooses_on_validation_never_on_test(tmp_path, monkeypatch):
    """A trial with the best test UA but the worst validation UA is not chosen; the chosen one is run on
    tune.final_folds and that is what gets registered."""
    import serray.tune as st

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    (Path(cfg.tune.dir) / cfg.tune.name).mkdir(parents=True)
    chosen = {}

    def fake_final(cfg_, hyper, trial_id, echo=print):
        chosen.update(hyper=hyper, trial_id=trial_id)
        return {"mean": {"ua": 0.5}, "std": {"ua": 0.0}, "registered": "entry-1"}

    monkeypatch.setattr(st, "run_final", fake_final)
    test_best = {"val_ua": 0.20, "test_ua": 0.95, "done_trial": 1, "trial_id": "t0", "trial_dir": "/x/t0"}
    val_best = {"val_ua": 0.80, "test_ua": 0.30, "done_trial": 1, "trial_id": "t1", "trial_dir": "/x/t1"}
    grid = _fake_grid([("t0", "TERMINATED", test_best, None), ("t1", "TERMINATED", val_best, None)])
    out = st.summarise_sweep(cfg, grid, {"adapter.mask_ratio": ("choice", [0.3, 0.4])}, echo=lambda *_: None)
    assert chosen["trial_id"] == "t1" and chosen["hyper"] == {"adapter.mask_ratio": pytest.approx(0.4)}
    assert out["best"]["trial_id"] == "t1" and out["registered"] == "entry-1"
    md = (Path(cfg.tune.dir) / cfg.tune.name / "trials.md").read_text()
    assert "test_ua (info only)" in md and "ranked on validation metrics only" in md


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
def sweep(featurized, tmp_path_factory):
    """4 trials; the two with finetune.fail_at_step=2 crash once (max_failures=0): an interrupted sweep."""
    from serray.tune import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = _cfg(featurized, tmp, SPACE)
    with pytest.raises(SerrayError, match="rerun the same command"):
        run_sweep(cfg, echo=lambda *_: None)
    first = pd.read_csv(Path(cfg.tune.dir) / cfg.tune.name / "trials.csv")
    entries_first = list_entries(cfg.registry.dir)
    second = run_sweep(cfg, echo=lambda *_: None)
    return cfg, first, entries_first, second


def _attempts(trial_dir) -> int:
    return len((Path(trial_dir) / "attempts.log").read_text().splitlines())


@pytest.mark.ray
@pytest.mark.sweep
def test_interrupted_sweep_registers_the_final_run_of_the_best_validation_trial(sweep):
    cfg, first, entries_first, second = sweep
    assert len(first) == 4
    assert (first["status"] == "ERROR").sum() == 2
    assert set(first.loc[first["status"] == "ERROR", "finetune.fail_at_step"]) == {2}
    finished = first[first["status"] == "finished"]
    assert len(finished) >= 1
    assert len(entries_first) == 1
    best = best_trial(finished, "val_ua", "max")  # ties (common on the tiny corpus) go to the lowest trial_id
    entry = entries_first[0]
    assert entry["hyperparameters"]["adapter.mask_ratio"] == pytest.approx(best["adapter.mask_ratio"])
    assert entry["folds"] == [1, 2] and entry["protocol"] == "inductive"  # the final run, on tune.final_folds
    assert "val_ua" in entry["selected_on"] and entry["source"] == "tune"
    final = json.loads((Path(cfg.tune.dir) / cfg.tune.name / "final" / "finetune" / "metrics.json").read_text())
    assert entry["metrics"]["ua"] == pytest.approx(final["mean"]["ua"])
    reg_cfg = load_config(Path(entry["path"]) / "config.yaml")
    assert reg_cfg.adapter.mask_ratio == pytest.approx(best["adapter.mask_ratio"])


@pytest.mark.ray
@pytest.mark.sweep
def test_restored_sweep_does_not_rerun_finished_trials_and_shares_pretraining(sweep):
    cfg, first, _, second = sweep
    exp = Path(cfg.tune.dir) / cfg.tune.name
    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == 4 and not (table["status"] == "ERROR").any()
    for _, row in first.iterrows():
        expected = 2 if row["status"] == "ERROR" else 1
        assert _attempts(exp / "trials" / row["trial_id"]) == expected, (row["trial_id"], row["status"])
    # trials with the same pre-training settings share one pre-training: 2 mask ratios -> 2 adapters
    assert len(list((exp / "pretrain").glob("*/fold1/adapter/meta.json"))) == 2
    fin = table[table["status"] == "finished"]
    assert second["best"]["val_ua"] == pytest.approx(fin["val_ua"].max())
    for f in ("trials.csv", "trials.md", "sweep.png"):
        assert (exp / f).stat().st_size > 0


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


def test_interrupted_sweep_registers_nothing(tmp_path):
    from serray.tune import summarise_sweep

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    (Path(cfg.tune.dir) / cfg.tune.name).mkdir(parents=True)
    done = {"test_ua": 0.6, "val_ua": 0.5, "done_trial": 1, "trial_id": "t0", "trial_dir": "/x"}
    grid = _fake_grid([("t0", "TERMINATED", done, None),
                       ("t1", "TERMINATED", {"val_ua": 0.2, "trial_id": "t1"}, None),   # ASHA stopped it
                       ("t2", "PENDING", {"val_ua": 0.4, "trial_id": "t2"}, None)])     # Ctrl-C while running
    with pytest.raises(SerrayError, match="interrupted with 1 trial.*rerun the same command"):
        summarise_sweep(cfg, grid, {"adapter.mask_ratio": ("choice", [0.3, 0.4, 0.5])}, echo=lambda *_: None)
    table = pd.read_csv(Path(cfg.tune.dir) / cfg.tune.name / "trials.csv")
    assert list(table["status"]) == ["finished", "stopped early", "interrupted"]
    assert list_entries(cfg.registry.dir) == []


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

