"""The main job: corpus -> manifest -> featurize -> pre-train -> leave-one-session-out fine-tune.

Every stage is skipped when its output exists and matches the config (features resume, the
pre-trained adapter and each finished fold carry a config hash), so rerunning the same command after
an interruption continues where it stopped, locally or as a Ray job on a cluster.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict

from serray import storage
from serray.config import save_config
from serray.data.prepare import prepare_corpus


def run_pipeline(cfg, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run every stage; return a summary with the fine-tuning results."""
    from serray.data.features.featurize import featurize, featurize_summary
    from serray.train.finetune import protocol, run_finetune, uses_pretraining
    from serray.train.pretrain import pretrain_summary, run_pretrain
    from serray.train.tasks import loso_table

    t0 = time.time()
    save_config(cfg, cfg.output_dir)
    echo(f"[1/3] corpus and manifest ({cfg.data.root})")
    prepare_corpus(cfg, echo)
    echo(f"[2/3] featurizing with {cfg.encoder.name} on Ray Data")
    echo(featurize_summary(featurize(cfg)))
    pre = None
    folds = list(cfg.finetune.folds)
    if uses_pretraining(cfg) and not cfg.pretrain.per_fold and not cfg.finetune.init_from:
        echo("[3/3] pre-training one shared adapter (pretrain.per_fold=false: transductive protocol), then "
             f"leave-one-session-out fine-tuning, folds {folds}")
        pre = run_pretrain(cfg)
        echo(pretrain_summary(pre))
    elif uses_pretraining(cfg) and not cfg.finetune.init_from:
        echo(f"[3/3] leave-one-session-out, folds {folds}: per fold, pre-train the adapter on the other sessions "
             f"(inductive protocol), then fine-tune")
    else:
        echo(f"[3/3] leave-one-session-out fine-tuning (finetune.mode={cfg.finetune.mode}), folds {folds}")
    results = run_finetune(cfg)
    out = storage.describe(cfg.finetune.dir)
    echo(loso_table(cfg, results, results.get("title", "")))  # (finetune.task: the four classes or CCC per dimension)
    plots = "confusion_matrix.png" if cfg.finetune.task == "categorical" else "dimensions_scatter.png"
    echo(f"results in {out}: metrics.json, results.md, predictions.csv, {plots}, learning_curves.png")
    echo(f"protocol: {protocol(cfg)}; pipeline finished in {time.time() - t0:.0f} s")
    return {"results": results, "pretrain": pre, "seconds": time.time() - t0}
