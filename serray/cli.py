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

from serray import storage
from serray.config import load_config, to_yaml
from serray.errors import ConfigError, SerrayError

log = logging.getLogger("serray")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: configs/base.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (OmegaConf dotlist)")


def _cfg(args: argparse.Namespace, extra: Optional[List[str]] = None):
    return load_config(args.config, [*args.overrides, *(extra or [])])


def _quiet(cfg, args):
    """Ray's own console lines go to ``output_dir/logs/ray.log`` (``-v``: to the terminal)."""
    from serray.progress import quiet

    return quiet(Path(cfg.output_dir) / "logs", verbose=getattr(args, "verbose", False))


def cmd_make_corpus(args) -> int:
    from serray.data.prepare import make_synthetic

    cfg = _cfg(args, [f"data.root={args.out}"] if args.out else None)
    layout = args.layout or str(cfg.data.corpus)
    root = make_synthetic(cfg, Path(cfg.data.root), layout)
    print(f"synthetic corpus in the {layout} layout written to {root}"
          + (f"\nread it with: serray manifest --root {root} data.corpus={layout}" if layout != "iemocap" else ""))
    if cfg.synthetic.preset == "benchmark" and layout == "iemocap":
        from serray.data.synthetic import benchmark_paths

        paths = benchmark_paths(root)
        print(f"unlabelled speech of other speakers: {paths.unlabelled}\n"
              f"oracle (synthesis parameters): {paths.oracle}")
    return 0


def cmd_manifest(args) -> int:
    from serray.data import corpora
    from serray.data.corpora.base import write_manifest

    extra = ([f"data.root={args.root}"] if args.root else []) + ([f"data.manifest={args.out}"] if args.out else [])
    cfg = _cfg(args, extra)
    report = corpora.build_manifest(cfg)
    path = write_manifest(report.kept, cfg.data.manifest, report.classes, report.class_setting)
    print(report.summary())
    print(f"manifest: {len(report.kept)} utterances -> {path}")
    return 0


def cmd_featurize(args) -> int:
    from serray.data.features.featurize import featurize, featurize_summary

    cfg = _cfg(args)
    with _quiet(cfg, args):
        summary = featurize(cfg, overwrite=args.overwrite)
    print(featurize_summary(summary))
    return 0


def cmd_pretrain(args) -> int:
    from serray.train.pretrain import pretrain_summary, run_pretrain

    from serray.progress import echo

    from serray.tracking import Tracker

    cfg = _cfg(args)
    target = Tracker.of(cfg).target()  # one MLflow run per pre-training (serray-pretrain)
    with _quiet(cfg, args):
        if cfg.pretrain.per_fold:
            for fold in cfg.finetune.folds:  # one adapter per fold, each without its test session
                echo(pretrain_summary(run_pretrain(cfg, fold, force=args.force, tracking=target)))
        else:
            echo(pretrain_summary(run_pretrain(cfg, force=args.force, tracking=target)))
    return 0


def cmd_finetune(args) -> int:
    from serray.train.tasks import loso_table
    from serray.train.finetune import run_finetune

    cfg = _cfg(args)
    with _quiet(cfg, args):
        summary = run_finetune(cfg)
    print(loso_table(cfg, summary, summary.get("title", "")))  # (finetune.task: the four classes or CCC per dimension)
    print(f"results in {storage.describe(cfg.finetune.dir)}: metrics.json, results.md, predictions.csv, confusion_matrix.png")
    return 0


def cmd_pipeline(args) -> int:
    """The main job: (synthetic corpus) -> manifest -> featurize -> pretrain -> LOSO fine-tune -> table."""
    from serray.pipeline import run_pipeline
    from serray.progress import echo

    cfg = _cfg(args)
    with _quiet(cfg, args):
        run_pipeline(cfg, echo=echo)
    return 0


def cmd_ablate(args) -> int:
    from serray.progress import echo
    from serray.train.ablation import run_ablation

    cfg = _cfg(args)
    with _quiet(cfg, args):
        run_ablation(cfg, echo=echo)
    return 0


def cmd_tune(args) -> int:
    from serray.progress import echo
    from serray.tune import run_sweep

    cfg = _cfg(args)
    with _quiet(cfg, args):
        run_sweep(cfg, echo=echo)
    return 0


def cmd_models(args) -> int:
    from serray.train.registry import format_entries, get_entry, scan_entries, wanted_evaluation

    cfg = _cfg(args)
    if args.action == "list":
        print(format_entries(*scan_entries(cfg.registry.dir)))
        return 0
    entry = get_entry(cfg.registry.dir, args.id, wanted_evaluation(cfg))
    entry = {**entry, "path": storage.redact(entry.get("path", ""))}  # no storage credentials on the terminal
    print(storage.redact_text(json.dumps(entry, indent=2)))
    return 0


def cmd_evaluate(args) -> int:
    from serray.evaluate import run_evaluate
    from serray.progress import echo

    cfg = _cfg(args)
    with _quiet(cfg, args):
        run_evaluate(cfg, args.model, echo=echo, reference_features=None if args.reference == "none" else args.reference)
    return 0


def cmd_predict(args) -> int:
    cfg = _cfg(args)
    if bool(args.segments) == bool(args.files):
        raise ConfigError("give audio files, or one recording with --segments FILE")
    if args.onnx and args.segments:
        raise ConfigError("--segments runs a registered model; --onnx classifies whole clips (give the files)")
    if args.onnx:  # onnxruntime only: neither torch nor Ray is imported
        import pandas as pd

        from serray.predict_onnx import OnnxPredictor

        rows = OnnxPredictor(args.onnx).predict_files(args.files, cfg.serve.min_seconds, cfg.serve.max_seconds)
        df = pd.DataFrame(rows)
        print(df.to_json(orient="records", indent=2) if args.json else
              f"model {args.onnx} (onnxruntime)\n" + df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        return 0
    from serray.predict import Predictor
    from serray.train.registry import resolve_model

    path, entry = resolve_model(cfg)
    predictor = Predictor.from_checkpoint(path)
    if args.segments:
        from serray.segment import predict_segments_cli

        return predict_segments_cli(predictor, args.segments, cfg, as_json=args.json, model=f"model {entry['id']} ({path})")
    df = predictor.predict_files(args.files, min_seconds=cfg.serve.min_seconds, max_seconds=cfg.serve.max_seconds)
    if args.json:
        print(df.to_json(orient="records", indent=2))
    else:
        print(f"model {entry['id']} ({path})")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_export(args) -> int:
    from serray.export import default_path, export_onnx
    from serray.train.registry import resolve_model

    cfg = _cfg(args, [f"serve.model={args.id}"] if args.id else None)
    path, entry = resolve_model(cfg)
    out = args.out or str(default_path(cfg.export.dir, entry))  # refuses an id that would leave export.dir
    s = export_onnx(path, entry, out, include_encoder=cfg.export.include_encoder and not args.no_encoder,
                    int8=cfg.export.int8 or args.int8)
    worst = max(s["parity_max_abs_diff"].values())
    what = f"labels {s['labels']}" if s.get("task", "categorical") == "categorical" else \
        f"task {s['task']}, outputs {s['outputs']}, dimensions {s['dimensions']}" + \
        (f", labels {s['labels']}" if s["labels"] else "")
    print(f"entry {entry['id']} -> {s['path']} ({s['bytes'] / 2**20:.1f} MB, input '{s['input']}', "
          f"{what}, {s['sample_rate']} Hz) in {s['seconds']} s\n"
          f"parity with torch on random clips of {', '.join(s['parity_max_abs_diff'])} s: max |dp| = {worst:.1e}")
    if "int8_path" in s:
        c = s["int8_parity"]
        print(f"int8: {s['int8_path']} ({s['int8_bytes'] / 2**20:.1f} MB), checked on {c['clips']} random clips: "
              f"max |d| = {c['max_abs_diff']:.1e} (tolerance {c['tolerance']:g})"
              + (f", labels agree on {c['labels_agree']}" if c.get("labels_agree") else ""))
    print(f"run it: serray predict --onnx {s['path']} FILE...")
    return 0


def cmd_reproduce(args) -> int:
    from serray.progress import echo
    from serray.reproduce import reproduce

    if args.config is not None:
        raise ConfigError(f"serray reproduce runs the config recorded in {args.run_dir}'s metrics.json, so --config "
                          f"{args.config} would not be used: leave it out (key=value overrides still apply)")
    return 0 if reproduce(args.run_dir, args.out, args.tolerance, args.overrides, echo=echo, allow_env=args.allow_env,
                          allow_outside=args.allow_outside, strict=args.strict) else 1


def cmd_serve(args) -> int:
    from serray.serve.app import run_server

    run_server(_cfg(args), blocking=True)
    return 0


def cmd_config(args) -> int:
    print(to_yaml(_cfg(args)), end="")
    return 0


COMMANDS: Dict[str, tuple[Callable, str]] = {
    "make-corpus": (cmd_make_corpus, "write the synthetic corpus (IEMOCAP layout, or --layout crema-d / ravdess / emodb / msp-podcast / csv)"),
    "manifest": (cmd_manifest, "parse a corpus (data.corpus) into a Parquet manifest"),
    "featurize": (cmd_featurize, "frozen-encoder features with Ray Data -> Parquet partitioned by session"),
    "pretrain": (cmd_pretrain, "pre-train the adapter (teacher-student, EMA, local attributes) on Ray Train"),
    "finetune": (cmd_finetune, "SAP + classifier, 5-fold leave-one-session-out (folds as parallel Tune trials)"),
    "ablate": (cmd_ablate, "ablation on the same folds: no adapter / adapter w/o local attributes / full"),
    "pipeline": (cmd_pipeline, "the main job, end to end"),
    "tune": (cmd_tune, "Ray Tune sweep (ASHA) over adapter hyper-parameters; registers the best trial"),
    "models": (cmd_models, "the model registry: `serray models list`, `serray models show ID`"),
    "evaluate": (cmd_evaluate, "score a registered model on another corpus's test split (cross-corpus)"),
    "predict": (cmd_predict, "predict emotions of audio files with a registered model"),
    "export": (cmd_export, "write a registry entry as one ONNX graph (`serray export --format onnx [ID]`)"),
    "reproduce": (cmd_reproduce, "re-run a run from the provenance in its metrics.json and compare the metrics"),
    "serve": (cmd_serve, "Ray Serve HTTP endpoint for a registered model (blocks until Ctrl-C)"),
    "config": (cmd_config, "print the resolved config"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serray", description="Speech emotion recognition with adapters on Ray")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own output on the terminal (default: output_dir/logs/ray.log)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == "make-corpus":
            p.add_argument("--out", help="corpus root to create (default: data.root)")
            p.add_argument("--layout", default=None, help="iemocap | crema-d | ravdess | emodb | msp-podcast | csv "
                                                          "(default: data.corpus)")
        if name == "manifest":
            p.add_argument("--root", help="the corpus's release directory, or the CSV (default: data.root)")
            p.add_argument("--out", help="manifest Parquet file (default: data.manifest)")
        if name == "featurize":
            p.add_argument("--overwrite", action="store_true", help="replace features made with another encoder")
        if name == "models":
            p.add_argument("action", choices=("list", "show"))
            p.add_argument("id", nargs="?", default=None, help="entry id for `show` (default: the best)")
        if name == "evaluate":
            p.add_argument("--model", default=None, help="registry entry id (default: the best by validation UA)")
            p.add_argument("--reference", default="egemaps", choices=("egemaps", "compare", "none"),
                           help="openSMILE functionals + logistic regression beside the model (default: egemaps)")
        if name == "predict":
            p.add_argument("files", nargs="*", help="WAV/FLAC files")
            p.add_argument("--segments", metavar="FILE", default=None,
                           help="a recording of any length: time-stamped segments + an aggregate (segment.*)")
            p.add_argument("--json", action="store_true", help="print JSON records")
            p.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                           help="run a graph written by `serray export` with onnxruntime (no torch, no Ray)")
        if name == "export":
            p.add_argument("--format", required=True, choices=("onnx",), help="onnx (the only format)")
            p.add_argument("id", nargs="?", default=None, help="registry entry id (default: the best)")
            p.add_argument("--out", default=None, help="the .onnx file (default: export.dir/<id>.onnx)")
            p.add_argument("--no-encoder", action="store_true",
                           help="leave the front end out: the graph takes features (export.include_encoder=false)")
            p.add_argument("--int8", action="store_true", help="also write a dynamically int8-quantised graph")
        if name == "reproduce":
            p.add_argument("run_dir", help="the output_dir of a finished run (or its finetune/)")
            p.add_argument("--out", default=None, help="where the new run goes (default: RUN_DIR-reproduced)")
            p.add_argument("--tolerance", type=float, default=0.0,
                           help="largest accepted |difference| of a metric (fraction; default 0: exact)")
            p.add_argument("--strict", action="store_true",
                           help="refuse to run when the commit, dirty flag or package versions differ from the record "
                                "(default: print what differs on stderr and run)")
            p.add_argument("--allow-env", action="store_true",
                           help="resolve ${oc.env:...} in the recorded config (default: refused)")
            p.add_argument("--allow-outside", action="store_true",
                           help="let the recorded config write outside --out (default: refused; key=value on the "
                                "command line is never refused)")
        if name in ("pretrain",):
            p.add_argument("--force", action="store_true", help="train again even if the output matches the config")
        if name == "models":
            p.add_argument("--config", default=None, help="YAML config (default: configs/base.yaml)")
        else:
            _add_common(p)
    return parser


def _split_positionals(args: argparse.Namespace) -> None:
    """``predict``/``models`` mix their own positionals with ``key=value`` overrides: sort them out."""
    if args.command == "predict":
        items = list(args.files)
        args.files = [a for a in items if "=" not in a or Path(a).exists()]
        args.overrides = [a for a in items if a not in args.files]
    elif args.command == "export" and args.id is not None and "=" in args.id:
        args.overrides, args.id = [args.id, *args.overrides], None
    elif args.command == "models":
        extra = list(getattr(args, "overrides", []) or [])
        if args.id is not None and "=" in args.id:
            extra.insert(0, args.id)
            args.id = None
        ids = [a for a in extra if "=" not in a]
        if ids:
            args.id = ids[0]
        args.overrides = [a for a in extra if "=" in a]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "models":
        args.overrides = rest
    elif rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*(args.overrides or []), *rest]  # key=value after an option (`--model X k=v`)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _split_positionals(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # no storage credentials in any log line
        handler.addFilter(storage.RedactingFilter())
    from serray import tracking

    tracking.COMMAND["name"] = args.command  # the default MLflow experiment: serray-<command>
    try:
        return COMMANDS[args.command][0](args)
    except SerrayError as e:
        print(f"serray {args.command}: error: {storage.redact_text(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
