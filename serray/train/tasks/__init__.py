"""The fine-tuning tasks (``finetune.task``): what differs between the four-class task and the
dimensional / multitask one, behind one small interface, so the fold runner, the results, the
ablation and the commands ask the task instead of branching on its name.

* :mod:`serray.train.tasks.categorical`: the four classes (UA / WA / macro-F1), and the loop task
  :class:`~serray.train.tasks.categorical.FinetuneTask` every fine-tuning run plugs into the shared loop;
* :mod:`serray.train.tasks.dimensional`: valence / arousal / dominance (CCC, Pearson r, MAE), and
  ``multitask`` (both heads: the dimensional outputs plus UA / WA / macro-F1).

:func:`task_of` gives a config's task, :func:`get_task` a task by name, :func:`scored_by` the task whose
run-level statistics compare arms on a metric (``ua``: categorical; ``ccc_*``: dimensional).
The task modules are imported when a task is asked for, so importing this package stays light;
imports run one way: ``finetune`` / ``ablation`` -> ``tasks`` -> ``tasks.dimensional`` -> ``tasks.categorical``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

TASKS = ("categorical", "dimensional", "multitask")


def task_name(cfg) -> str:
    """``finetune.task`` (default ``categorical``)."""
    return str(cfg.finetune.get("task", "categorical") or "categorical")


class Task:
    """What a fine-tuning task decides (one instance per ``finetune.task``; stateless).

    ``name``: ``finetune.task``; ``loop_task``: the class the shared loop (:mod:`serray.train.loop`) runs;
    ``has_classes`` / ``has_dimensions``: which heads its models have."""

    name: str = ""
    has_classes: bool = True
    has_dimensions: bool = False

    @property
    def loop_task(self) -> type:
        raise NotImplementedError

    # ------------------------------------------------------------ metrics and selection
    def metric_keys(self, cfg) -> List[str]:
        """The test metrics of a fold (the keys of metrics.json's ``mean`` / ``std``)."""
        raise NotImplementedError

    def select_metric(self, cfg) -> str:
        """The validation metric that picks a fold's epoch (and the registry's fold model)."""
        raise NotImplementedError

    # ------------------------------------------------------------ one fold
    def prepare_split(self, cfg, split: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Dict[int, int]]]:
        """A fold's split with what the task needs on its rows, and the rows dropped (per split and group)."""
        return split, {}

    def loop_config(self, cfg, split: Dict[str, Any], model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The task's keys of a fold's loop config (none beyond the shared ones by default)."""
        return {}

    def selection_record(self, best_metrics: Dict[str, Any], dims_dropped: Dict[str, Any]) -> Dict[str, Any]:
        """The task's keys of a fold's ``selection.json`` (none by default)."""
        return {}

    def test_metrics(self, cfg, preds, test_rows) -> Tuple[Any, Dict[str, float]]:
        """The test predictions as ``predictions.csv`` holds them, and their metrics over the whole split."""
        raise NotImplementedError

    # ------------------------------------------------------------ a run's results
    def run_record(self, cfg) -> Dict[str, Any]:
        """The task's keys of metrics.json beside ``mode`` (none by default)."""
        return {}

    def title_suffix(self, cfg) -> str:
        """What the run's title adds for this task (nothing by default)."""
        return ""

    def write_results(self, cfg, folds: List[Dict[str, Any]], out_dir, extra: Dict[str, Any],
                      folds_dir: Optional[str] = None) -> Dict[str, Any]:
        """metrics.json, results.md, predictions.csv and the plots of finished folds."""
        raise NotImplementedError

    def loso_table(self, cfg, summary: Dict[str, Any], title: str = "") -> str:
        """The LOSO table (results.md) of a summary."""
        raise NotImplementedError

    # ------------------------------------------------------------ run-level statistics (the ablation)
    def prediction_columns(self, cfg) -> List[str]:
        """The columns of a predictions frame (beside ``seed``, ``fold``, ``utt_id``) its statistics read."""
        raise NotImplementedError

    def run_scores(self, preds) -> Dict[str, float]:
        """One run's test scores from its predictions."""
        raise NotImplementedError

    def build_ablation(self, cells, protocol: str, folds: Sequence[int], seeds: Sequence[int], metric: str,
                       names: Sequence[str], n_boot: int = 2000, boot_seed: int = 0,
                       arm_val: Optional[Dict[Any, Dict[Any, float]]] = None,
                       classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Per-arm summaries and paired run-level comparisons of ``metric`` (the ablation dict); ``classes``:
        the run's classes in index order (``data.classes``; None: the four)."""
        raise NotImplementedError

    def ablation_record(self, cfg) -> Dict[str, Any]:
        """The task's keys of ablation.json beside ``encoder`` (none by default)."""
        return {}

    def write_ablation(self, ablation: Dict[str, Any], out_dir) -> Dict[str, Path]:
        """``ablation.json``, ``ablation.md`` (and a plot, where the task has one); ``{kind: path}``."""
        raise NotImplementedError


def get_task(name: str) -> Task:
    """The task named ``name`` (``categorical``, ``dimensional`` or ``multitask``)."""
    if name == "categorical":
        from serray.train.tasks.categorical import Categorical

        return Categorical()
    if name in ("dimensional", "multitask"):
        from serray.train.tasks.dimensional import Dimensional

        return Dimensional(multitask=name == "multitask")
    raise ValueError(f"unknown finetune.task '{name}': one of {', '.join(TASKS)}")


def task_of(cfg) -> Task:
    """The task of a config (``finetune.task``)."""
    return get_task(task_name(cfg))


def scored_by(metric: str) -> Task:
    """The task whose run-level statistics compare arms on ``metric`` (``ablate.metric``): ``ua`` the
    four-class ones, ``ccc_mean`` / ``ccc_<dimension>`` the dimensional ones."""
    return get_task("categorical" if metric == "ua" else "dimensional")


def loso_table(cfg, summary: Dict[str, Any], title: str = "") -> str:
    """The LOSO table of a run of ``cfg``'s task (the four-class table, or CCC per dimension)."""
    return task_of(cfg).loso_table(cfg, summary, title)
