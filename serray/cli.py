"""The ``serray`` command line.

Every command takes ``--config FILE`` (default ``configs/base.yaml``) plus ``key=value`` overrides,
e.g. ``serray featurize data.root=/data/IEMOCAP_full_release encoder.name=facebook/hubert-large-ll60k``.
User errors (paths, layouts, config keys, audio) print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from serray.config import load_config, save_config, to_yaml
from serray.errors import SerrayError

log = logging.getLogger("serray")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: configs/base.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")


def _cfg(args: argparse.Namespace, extra: Optional[List[str]] = None):
    return load_config(args.config, [*args.overrides, *(extra or [])])


def cmd_make_corpus(args) -> int:
    from serray.data.synthetic import make_corpus

    cfg = _cfg(args, [f"data.root={args.out}"] if args.out else None)
    root = make_corpus(cfg.data.root, **_synthetic_kwargs(cfg), progress=True)
    print(f"synthetic IEMOCAP-layout corpus written to {root}")
    return 0


def _synthetic_kwargs(cfg) -> dict:
    from serray.config import as_dict

    kw = as_dict(cfg.synthetic)
    kw.pop("enabled", None)
    return kw


def cmd_manifest(args) -> int:
    from serray.data.iemocap import build_manifest, write_manifest

    extra = ([f"data.root={args.root}"] if args.root else []) + ([f"data.manifest={args.out}"] if args.out else [])
    cfg = _cfg(args, extra)
    report = build_manifest(cfg.data.root, cfg.data.sessions, cfg.data.merge_excited)
    path = write_manifest(report.kept, cfg.data.manifest)
    print(report.summary())
    print(f"manifest: {len(report.kept)} utterances -> {path}")
    return 0


def cmd_featurize(args) -> int:
    from serray.data.featurize import featurize

    cfg = _cfg(args)
    summary = featurize(cfg, overwrite=args.overwrite)
    print(featurize_summary(summary))
    return 0


def featurize_summary(s: dict) -> str:
    enc = s["encoder"]
    per = ", ".join(f"S{k}: {v}" for k, v in sorted(s["rows_per_session"].items()))
    return (f"features: {s['stored']} utterances in {s['features_dir']} ({per}); "
            f"{s['written']} computed now in {s['seconds']} s, {s['skipped']} skipped\n"
            f"encoder: {enc['encoder']} layers={enc['layers']} dim={enc['dim']} frame_rate={enc['frame_rate']} Hz, float16")


def cmd_pretrain(args) -> int:
    from serray.train.pretrain import run_pretrain

    cfg = _cfg(args)
    print(pretrain_summary(run_pretrain(cfg, force=args.force)))
    return 0


def pretrain_summary(s: dict) -> str:
    m = s.get("metrics") or {}
    keys = ("epoch", "loss", "loss_mask", "loss_distill", "loss_cluster", "cos_ts", "cluster_entropy", "dead_clusters")
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
    how = "reused (config unchanged)" if s.get("reused") else "trained"
    return f"pre-trained adapter {how}: {s['adapter']}\n  final epoch: {shown}"


def cmd_finetune(args) -> int:
    from serray.train.finetune import run_finetune
    from serray.train.results import markdown_table

    cfg = _cfg(args)
    summary = run_finetune(cfg)
    print(markdown_table(summary, summary.get("title", "")))
    print(f"results in {Path(cfg.finetune.dir)}: metrics.json, results.md, predictions.csv, confusion_matrix.png")
    return 0


def cmd_pipeline(args) -> int:
    """The main job: (synthetic corpus) -> manifest -> featurize -> pretrain -> LOSO fine-tune -> table."""
    from serray.pipeline import run_pipeline

    run_pipeline(_cfg(args), echo=print)
    return 0


def cmd_ablate(args) -> int:
    from serray.train.ablation import run_ablation

    run_ablation(_cfg(args), echo=print)
    return 0


def cmd_config(args) -> int:
    print(to_yaml(_cfg(args)), end="")
    return 0


COMMANDS: Dict[str, tuple[Callable, str]] = {
    "make-corpus": (cmd_make_corpus, "write the synthetic corpus in IEMOCAP_full_release layout"),
    "manifest": (cmd_manifest, "parse an IEMOCAP tree into a Parquet manifest"),
    "featurize": (cmd_featurize, "frozen-encoder features with Ray Data -> Parquet partitioned by session"),
    "pretrain": (cmd_pretrain, "pre-train the adapter (teacher-student, EMA, local attributes) on Ray Train"),
    "finetune": (cmd_finetune, "SAP + classifier, 5-fold leave-one-session-out (folds as parallel Tune trials)"),
    "ablate": (cmd_ablate, "ablation on the same folds: no adapter / adapter w/o local attributes / full"),
    "pipeline": (cmd_pipeline, "the main job, end to end"),
    "config": (cmd_config, "print the resolved config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serray", description="Speech emotion recognition with adapters on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_common(p)
        if name == "make-corpus":
            p.add_argument("--out", help="corpus root to create (default: data.root)")
        if name == "manifest":
            p.add_argument("--root", help="IEMOCAP_full_release directory (default: data.root)")
            p.add_argument("--out", help="manifest Parquet file (default: data.manifest)")
        if name == "featurize":
            p.add_argument("--overwrite", action="store_true", help="replace features made with another encoder")
        if name in ("pretrain",):
            p.add_argument("--force", action="store_true", help="train again even if the output matches the config")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command][0](args)
    except SerrayError as e:
        print(f"serray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
