"""The paper's ablation on the same folds and seeds: (a) no adapter, (b) the adapter pre-trained
without local attributes (``adapter.w_cluster=0``), (c) the full adapter.

Each variant is an ordinary pre-training + fine-tuning run with a few keys changed, in its own
directory under ``output_dir/ablation/``; the full variant reuses the main run's pre-training and
fine-tuning outputs when they match the config. Writes ``ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from serray import storage
from serray.config import derive

ABLATION_DIR = "ablation"


def variants(cfg) -> List[Tuple[str, str, List[str]]]:
    """(key, description, overrides) of the three variants."""
    base = Path(cfg.output_dir) / ABLATION_DIR
    no_la = base / "no_local_attributes"
    return [
        ("no_adapter", "(a) no adapter: encoder features -> SAP",
         ["finetune.mode=none", f"finetune.dir={base / 'no_adapter'}"]),
        ("no_local_attributes", "(b) adapter without local attributes (w_cluster=0)",
         ["adapter.w_cluster=0.0", f"pretrain.dir={no_la / 'pretrain'}", f"finetune.dir={no_la / 'finetune'}",
          f"finetune.init_from={no_la / 'pretrain' / 'adapter'}", f"finetune.mode={_adapter_mode(cfg)}"]),
        ("full", "(c) full adapter (mask prediction + self-distillation + local attributes)",
         [f"finetune.mode={_adapter_mode(cfg)}"]),
    ]


def _adapter_mode(cfg) -> str:
    return cfg.finetune.mode if cfg.finetune.mode != "none" else "frozen"


def ablation_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| variant | UA % | WA % | macro-F1 % |", "|---|---:|---:|---:|"]
    for r in rows:
        m, s = r["mean"], r["std"]
        lines.append(f"| {r['description']} | {100 * m['ua']:.2f} ± {100 * s['ua']:.2f} | "
                     f"{100 * m['wa']:.2f} ± {100 * s['wa']:.2f} | {100 * m['macro_f1']:.2f} ± {100 * s['macro_f1']:.2f} |")
    return "\n".join(lines) + "\n"


def run_ablation(cfg, echo: Callable[[str], Any] = print) -> Dict[str, Any]:
    """Run (or reuse) the three variants and write ``ablation.json`` / ``ablation.md``."""
    from serray.data.featurize import read_meta
    from serray.pipeline import prepare_corpus
    from serray.train.finetune import run_finetune
    from serray.train.pretrain import run_pretrain

    if not storage.is_file(storage.join(cfg.features.dir, "_serray_features.json")):
        from serray.data.featurize import featurize

        prepare_corpus(cfg, echo)
        featurize(cfg)
    read_meta(cfg.features.dir)
    rows = []
    for key, description, overrides in variants(cfg):
        vcfg = derive(cfg, overrides)
        echo(f"ablation {key}: {description}")
        if vcfg.finetune.mode != "none":
            run_pretrain(vcfg)
        res = run_finetune(vcfg)
        rows.append({"variant": key, "description": description, "overrides": overrides,
                     "finetune_dir": str(vcfg.finetune.dir), "mean": res["mean"], "std": res["std"],
                     "folds": res["folds"]})
    out = Path(cfg.output_dir) / ABLATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    summary = {"folds": list(cfg.finetune.folds), "seed": cfg.seed, "encoder": cfg.encoder.name, "variants": rows}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    table = ablation_table(rows)
    (out / "ablation.md").write_text(f"### Ablation (leave-one-session-out, folds {list(cfg.finetune.folds)})\n\n" + table)
    echo(table)
    echo(f"ablation written to {out / 'ablation.json'} and {out / 'ablation.md'}")
    return summary
