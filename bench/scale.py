#!/usr/bin/env python
"""Scale: the whole CPU pipeline at IEMOCAP size and at a quarter of it; how time and memory grow.

    python bench/scale.py                      # 1/4 and 1x IEMOCAP size (quiet 2-core box: ~35 min,
                                               # + 2-7 min making the 10,080-utterance corpus once)
    python bench/scale.py --quick              # 1/200 and 1/50, folds 1-2 (validation: ~3 min quiet, 12 loaded)
    python bench/scale.py --keep /data/scale   # keep (and on a rerun, reuse) the corpora; outputs are redone
    python bench/scale.py --fractions 1/4,1 --override features.cache_max_mb=0   # any config override

**Corpus** (not timed in any stage; its generation time is printed): the ``demo`` preset of
``serray.data.synthetic.make_corpus`` in IEMOCAP layout, durations uniform in 1.5-4.5 s,
``drop_fraction`` 0.45 (so ~55 % of the utterances are four-class, the rest carry labels the
4-class setup drops and are used unlabelled by pre-training), seed 0. Size fraction f of IEMOCAP
(10,039 utterances, 5,531 of them four-class) is ``dialogs_per_session = round(28 sqrt f)``,
``utterances_per_dialog = round(10,080 f / (5 dialogs_per_session))``: f=1 gives 28 x 72 x 5 = 10,080
utterances (~5,540 four-class, ~8.4 h of audio: with 1.5-4.5 s the audio is ~8.4 h rather than
IEMOCAP's ~7 h of four-class + ~12 h in all; ``--max-duration 3.5`` gives ~7 h for the same counts),
f=1/4 gives 14 x 36 x 5 = 2,520. The manifest keeps every utterance (``pretrain.use_unlabelled``).

**Stages**, each size in its own child process (a fresh driver and a fresh local Ray, so peaks are
not carried over), with the base config's ``fbank`` encoder and defaults except
``pretrain.epochs=1`` and ``finetune.epochs=1``:

1. ``featurize``: ``serray.data.features.featurize.featurize(cfg)`` (Ray Data; ``ray.init`` is done before
   and timed separately);
2. ``pretrain``: ``run_pretrain(cfg, fold, force=True)`` for folds 1-5 in the driver, as
   ``serray pretrain`` does (one pre-training epoch per fold on that fold's pool, inductive);
3. ``finetune``: ``run_folds(cfg)``, as ``serray finetune``: the five folds as Ray Tune trials
   (``finetune.max_concurrent_folds`` at a time), each fine-tuning one epoch from its adapter (reused,
   not retrained), selecting on validation and scoring its test session.

Per stage: wall time; throughput in audio-seconds and frames per second (featurize: all audio in,
frames stored; pretrain: the five pools' audio and frames after the ``max_frames`` crop, one epoch
each; finetune: the five training splits, one epoch each; evaluation and start-up are in the wall
time but not in the counts); the in-loop ``frames_per_s`` of the training loops (mean over folds);
and peak memory from /proc (``bench._common.StageSampler``: VmHWM reset at the start of each stage,
RSS sampled every 0.25 s): the *driver* (the child process that calls the entry points), each kind
of Ray *worker* process (Tune trials ``ray::ImplicitFunc``, Ray Data encoder actors
``ray::MapWorker(MapBatches(EncodeBatch))``, Ray Train workers, Ray's helper actors, idle workers)
and Ray's system processes (raylet, GCS, dashboard; shown, never in the RESULT).

**RESULT**: ``peak RSS at the smaller size / peak RSS at the larger size`` where peak RSS is the
largest single-process peak RSS among the driver and the Ray worker processes over all three
stages (the process that needs the biggest machine). ``target=0.83``: for 4x the data, that peak
may grow at most 1.2x. The summed figure (largest concurrent sum of driver + worker RSS, sampled)
is printed beside it with its own ratio, not used for the RESULT. RSS counts shared pages (shared
libraries, object-store pages a process touched) in each process that maps them.

Timings are never asserted; the machine's load (ours vs others', from /proc/stat) is printed per
stage, since other people's work on a shared machine slows every number here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import RAY_ENV, LoadMonitor, StageSampler, load_line, start_ray  # noqa: E402

TARGET = 0.83
IEMOCAP_UTTERANCES, IEMOCAP_FOUR_CLASS = 10_039, 5_531
FULL_DIALOGS, FULL_UTTERANCES = 28, 10_080  # 28 dialogs x 72 utterances x 5 sessions
STAGES = ("featurize", "pretrain", "finetune")


def corpus_knobs(fraction: float) -> tuple[int, int]:
    """``(dialogs_per_session, utterances_per_dialog)`` for ``fraction`` of IEMOCAP's size."""
    dps = max(1, round(FULL_DIALOGS * math.sqrt(fraction)))
    upd = max(2, round(FULL_UTTERANCES * fraction / (5 * dps)))
    return dps, upd


def parse_fraction(text: str) -> tuple[str, float]:
    f = Fraction(text.strip())
    if not 0 < f <= 4:
        raise argparse.ArgumentTypeError(f"fraction {text} out of (0, 4]")
    return (str(f) if f.denominator != 1 else f"{f.numerator}x"), float(f)


# ---------------------------------------------------------------------------- corpus (parent)


def prepare(work: Path, label: str, fraction: float, args) -> dict:
    """Make (or, with --keep, reuse) the corpus and its manifest for one size."""
    from bench._common import make_corpus_and_manifest
    from serray.data.corpora.base import read_manifest

    dps, upd = corpus_knobs(fraction)
    knobs = {"seed": args.seed, "dialogs_per_session": dps, "utterances_per_dialog": upd,
             "min_duration": args.min_duration, "max_duration": args.max_duration,
             "drop_fraction": args.drop_fraction}
    base = work / f"size_{label.replace('/', '_')}"
    stamp = base / "corpus.json"
    manifest_path = base / "manifest.parquet"
    t = time.perf_counter()
    if stamp.is_file() and json.loads(stamp.read_text()) == knobs and manifest_path.is_file():
        manifest, how = read_manifest(manifest_path), "reused"
    else:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        _, _, manifest = make_corpus_and_manifest(base, keep_unlabelled=True, **knobs)
        stamp.write_text(json.dumps(knobs))
        how = "made"
    gen_s = time.perf_counter() - t
    four = int(manifest["label"].isin(["neu", "hap", "sad", "ang"]).sum())
    return {"label": label, "fraction": fraction, "base": str(base), "root": str(base / "IEMOCAP_full_release"),
            "manifest": str(manifest_path), "knobs": knobs, "utterances": len(manifest), "four_class": four,
            "audio_s": float(manifest["duration"].sum()), "gen_s": gen_s, "how": how}


# ---------------------------------------------------------------------------- child: one size


def _child_cfg(args):
    from serray.config import load_config

    work = Path(args.work)
    return load_config(None, [f"output_dir={work / 'out'}", f"data.root={args.root}", f"data.manifest={args.manifest}",
                              "synthetic.enabled=false", "ray.progress_bars=false", "pretrain.epochs=1",
                              "finetune.epochs=1", "finetune.register=false", *args.override])


def _stage(name: str, sampler: StageSampler, mon: LoadMonitor, audio_s: float, frames: int, rows: int,
           loop_fps: float | None = None, notes: str = "") -> dict:
    return {"stage": name, "wall_s": sampler.wall, "audio_s": audio_s, "frames": int(frames), "rows": int(rows),
            "loop_fps": loop_fps, "mem": sampler.summary(), "load": mon.line(), "others_cores": mon.others_cores(),
            "cpu_by_process": mon.breakdown(6), "notes": notes}


def child_main(args) -> dict:
    import numpy as np
    import ray
    import torch

    from serray.data.features.featurize import featurize, read_meta, stored_utterances
    from serray.data.corpora.base import read_manifest
    from serray.train.finetune import fold_split, run_folds
    from serray.train.pretrain import pool_rows, pool_sessions, run_pretrain

    cfg = _child_cfg(args)
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # --keep reuses the corpus only: every stage runs from scratch
    out.mkdir(parents=True)
    folds = list(cfg.finetune.folds)
    manifest = read_manifest(cfg.data.manifest)
    duration = dict(zip(manifest["utt_id"], manifest["duration"]))

    init_s = start_ray(cfg)
    time.sleep(1.0)  # let the pre-started workers and the dashboard settle outside the clocks
    stages = []

    # 1. featurize
    with LoadMonitor() as mon, StageSampler() as s:
        fsum = featurize(cfg)
    stored = stored_utterances(cfg.features.dir, columns=("utt_id", "num_frames", "label"))
    frames_of = dict(zip(stored["utt_id"], stored["num_frames"].astype(int)))
    stages.append(_stage("featurize", s, mon, float(manifest["duration"].sum()), int(stored["num_frames"].sum()),
                         fsum["written"], notes=f"{fsum['written']} rows written, {fsum['skipped']} skipped"))
    meta = read_meta(cfg.features.dir)
    feat_mb = sum(f.stat().st_size for f in Path(cfg.features.dir).rglob("*.parquet")) / 2**20

    # 2. one pre-training epoch per fold, in the driver (serray pretrain)
    crop = cfg.pretrain.max_frames
    pools = {f: pool_rows(cfg, pool_sessions(cfg, f, meta))["utt_id"].tolist() for f in folds}
    fps = []
    with LoadMonitor() as mon, StageSampler() as s:
        for f in folds:
            res = run_pretrain(cfg, f, force=True)
            fps.append((res.get("metrics") or {}).get("frames_per_s"))
    audio = sum(duration[u] for f in folds for u in pools[f])
    frames = sum(min(frames_of[u], crop) if crop else frames_of[u] for f in folds for u in pools[f])
    fps = [x for x in fps if x]
    stages.append(_stage("pretrain", s, mon, audio, frames, sum(len(p) for p in pools.values()),
                         float(np.mean(fps)) if fps else None,
                         notes=f"pools of {min(len(p) for p in pools.values())}-{max(len(p) for p in pools.values())} rows, "
                               f"backend={cfg.pretrain.backend}"))

    # 3. one fine-tuning epoch per fold, folds as Tune trials (serray finetune)
    with LoadMonitor() as mon, StageSampler() as s:
        results = run_folds(cfg)
    crop = cfg.finetune.max_frames
    train_ids = {f: fold_split(cfg, f)["train"]["utt_id"].tolist() for f in folds}
    audio = sum(duration[u] for f in folds for u in train_ids[f])
    frames = sum(min(frames_of[u], crop) if crop else frames_of[u] for f in folds for u in train_ids[f])
    fps = [r["history"][-1]["frames_per_s"] for r in results if r.get("history")]
    epochs = sorted({r.get("epochs_run") for r in results})
    stages.append(_stage("finetune", s, mon, audio, frames, sum(len(t) for t in train_ids.values()),
                         float(np.mean(fps)) if fps else None,
                         notes=f"epochs_run {epochs}, mean test UA {np.mean([r['ua'] for r in results]):.3f}, "
                               f"backend={cfg.finetune.backend}, {cfg.finetune.max_concurrent_folds} folds at a time"))
    ray.shutdown()
    return {"init_s": init_s, "stages": stages, "feature_mb": feat_mb, "feature_rows": int(len(stored)),
            "cache_max_mb": float(cfg.features.cache_max_mb), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "ray_cpus": cfg.ray.num_cpus}


def run_child(size: dict, work: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--work", size["base"], "--root", size["root"],
           "--manifest", size["manifest"], *[f"--override={o}" for o in args.override]]
    if args.num_cpus:
        cmd.append(f"--override=ray.num_cpus={args.num_cpus}")
    if args.folds:
        cmd.append(f"--override=finetune.folds=[{args.folds}]")
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("RAY_ADDRESS", None)  # a bench starts its own local Ray: never join someone else's
    log_path = Path(size["base"]) / "child.log"
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, env=env, cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if args.verbose or proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + log_path.read_text()[-8000:])
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"scale bench child for size {size['label']} failed with status {proc.returncode} "
                         f"(log: {log_path})")
    return json.loads(lines[-1][len("BENCH "):])


# ---------------------------------------------------------------------------- report


def _rate(x: float, s: float) -> str:
    r = x / s if s > 0 else float("nan")
    return f"{r:,.0f}" if r >= 100 else f"{r:,.1f}"


def size_label(size: dict) -> str:
    return f"{size['label']} ({size['utterances']:,} utt, {size['four_class']:,} 4-class, {size['audio_s'] / 3600:.2f} h)"


def markdown_table(sizes: list, results: list) -> list:
    out = ["| corpus | stage | wall (s) | audio-s/s | frames/s | in-loop frames/s | driver peak RSS (MB) "
           "| largest worker peak RSS (MB, process) | summed RSS (MB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, res in zip(sizes, results):
        for st in res["stages"]:
            m = st["mem"]
            workers = m["workers"]
            wk, wv = (next(iter(workers.items())) if workers else ("-", {"max_mb": 0, "n": 0}))
            loop = f"{st['loop_fps']:,.0f}" if st.get("loop_fps") else "-"
            out.append(f"| {size_label(size)} | {st['stage']} | {st['wall_s']:.1f} | {_rate(st['audio_s'], st['wall_s'])} "
                       f"| {_rate(st['frames'], st['wall_s'])} | {loop} | {m['driver_mb']:,.0f} "
                       f"| {wv['max_mb']:,.0f} ({wk}) | {m['sum_mb']:,.0f} |")
    return out


def peaks(res: dict) -> dict:
    best = max(res["stages"], key=lambda st: st["mem"]["largest_mb"])
    best_sum = max(res["stages"], key=lambda st: st["mem"]["sum_mb"])
    return {"single_mb": best["mem"]["largest_mb"], "single_where": f"{best['mem']['largest_kind']}, {best['stage']}",
            "single_anon_mb": best["mem"]["largest_anon_mb"],
            "sum_mb": best_sum["mem"]["sum_mb"], "sum_where": best_sum["stage"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 1/200 and 1/50 of IEMOCAP (validation)")
    p.add_argument("--fractions", default=None, help="two sizes as fractions of IEMOCAP, smaller first "
                   "(default 1/4,1; --quick 1/200,1/50)")
    p.add_argument("--keep", default=None, help="work in this directory and keep it; corpora made there before "
                   "with the same knobs are reused (default: a temp dir, removed)")
    p.add_argument("--min-duration", type=float, default=1.5)
    p.add_argument("--max-duration", type=float, default=4.5)
    p.add_argument("--drop-fraction", type=float, default=0.45)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", default=None, help="LOSO folds to run, comma-separated (default all five; --quick 1,2: "
                   "one round of max_concurrent_folds=2 trials, to fit a loaded 2-core box)")
    p.add_argument("--num-cpus", type=int, default=None, help="ray.num_cpus (default: the config's, all cores)")
    p.add_argument("--override", action="append", default=[], help="extra config override key=value")
    p.add_argument("--verbose", action="store_true")
    # child mode (internal)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("serray").setLevel(logging.INFO if args.verbose else logging.WARNING)
        res = child_main(args)
        print("BENCH " + json.dumps(res), flush=True)
        return 0

    fractions = [parse_fraction(x) for x in (args.fractions or ("1/200,1/50" if args.quick else "1/4,1")).split(",")]
    if len(fractions) != 2 or fractions[0][1] >= fractions[1][1]:
        p.error("--fractions takes two sizes, smaller first")
    if args.quick and args.folds is None:
        args.folds = "1,2"
    import torch

    print(f"# scale bench: {load_line()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"encoder fbank, pretrain.epochs=1, finetune.epochs=1, folds {args.folds or '1-5'}, "
          f"overrides={args.override or '-'}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="serray-bench-scale-") if args.keep is None else None
    work = Path(tmp.name if tmp else args.keep).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes, results = [], []
    try:
        for label, frac in fractions:
            size = prepare(work, label, frac, args)
            k = size["knobs"]
            print(f"# corpus {label} of IEMOCAP: {k['dialogs_per_session']} dialogs/session x {k['utterances_per_dialog']} "
                  f"utterances/dialog x 5 sessions = {size['utterances']:,} utterances ({size['four_class']:,} four-class; "
                  f"IEMOCAP x {frac:g}: {IEMOCAP_UTTERANCES * frac:,.0f} / {IEMOCAP_FOUR_CLASS * frac:,.0f}), "
                  f"{size['audio_s'] / 3600:.2f} h of audio; {size['how']} in {size['gen_s']:.1f} s "
                  f"(generation not timed in any stage)", flush=True)
            t = time.perf_counter()
            res = run_child(size, work, args)
            print(f"# size {label}: child ran {time.perf_counter() - t:.0f} s (ray.init {res['init_s']:.1f} s, not in any "
                  f"stage); features {res['feature_rows']:,} rows, {res['feature_mb']:.1f} MB of Parquet "
                  f"(features.cache_max_mb={res['cache_max_mb']:g}: training "
                  f"{'holds pools in memory' if res['feature_mb'] * 0.8 <= res['cache_max_mb'] else 'streams from Parquet'})",
                  flush=True)
            for st in res["stages"]:
                m = st["mem"]
                kinds = ", ".join(f"{k} {v['max_mb']:.0f} MB (anon {v['anon_mb']:.0f}) x{v['n']}" for k, v in m["workers"].items())
                print(f"#   {st['stage']:<9} {st['wall_s']:7.1f} s; load: {st['load']}; CPU-s: {st['cpu_by_process']}", flush=True)
                print(f"#             peak RSS: driver {m['driver_mb']:.0f} MB (anon {m['driver_anon_mb']:.0f}); workers: {kinds or '-'}; "
                      f"summed {m['sum_mb']:.0f} MB (sum of peaks {m['sum_of_peaks_mb']:.0f}); ray system {m['system_mb']:.0f} MB"
                      f"{'' if m['hwm_reset'] else ' (VmHWM reset refused for some: sampled RSS)'}; {st['notes']}", flush=True)
            sizes.append(size)
            results.append(res)
    finally:
        if tmp:
            tmp.cleanup()

    print()
    print(f"Pipeline stages at {fractions[0][0]} and {fractions[1][0]} of IEMOCAP size (fbank, one epoch each; "
          f"{load_line()} at the end):")
    print()
    print("\n".join(markdown_table(sizes, results)))
    print()
    print("wall: the stage's entry point(s) end to end (ray.init excluded); audio-s/s and frames/s: the stage's audio and "
          "frames (featurize: all in / stored; pretrain: the 5 pools after the crop; finetune: the 5 training splits) per "
          "wall second; in-loop: the training loop's own frames/s (mean over folds); peak RSS per process from /proc, "
          "reset per stage; summed: the largest concurrent sum of driver + Ray worker RSS.")
    print()
    small, large = peaks(results[0]), peaks(results[1])
    growth = fractions[1][1] / fractions[0][1]
    for name in STAGES:
        a = next(st for st in results[0]["stages"] if st["stage"] == name)
        b = next(st for st in results[1]["stages"] if st["stage"] == name)
        print(f"{name:<9}: x{growth:g} data -> wall x{b['wall_s'] / a['wall_s']:.2f}, largest process RSS "
              f"x{b['mem']['largest_mb'] / a['mem']['largest_mb']:.2f} ({a['mem']['largest_mb']:.0f} -> "
              f"{b['mem']['largest_mb']:.0f} MB, {b['mem']['largest_kind']}), summed RSS x{b['mem']['sum_mb'] / a['mem']['sum_mb']:.2f}")
    for size in sizes:
        print(f"corpus {size['label']}: generation {size['gen_s']:.1f} s ({size['how']}; not in the ratio)")
    print(f"peak single-process RSS (driver + Ray workers, all stages): {fractions[0][0]} {small['single_mb']:.0f} MB "
          f"({small['single_where']}), {fractions[1][0]} {large['single_mb']:.0f} MB ({large['single_where']}); "
          f"private (RssAnon) part of that process: {small['single_anon_mb']:.0f} -> {large['single_anon_mb']:.0f} MB")
    print(f"peak summed RSS (driver + Ray workers, concurrent): {fractions[0][0]} {small['sum_mb']:.0f} MB "
          f"({small['sum_where']}), {fractions[1][0]} {large['sum_mb']:.0f} MB ({large['sum_where']}) -> "
          f"ratio {small['sum_mb'] / large['sum_mb']:.3f} (not the RESULT)")
    print(f"RESULT scale ratio={small['single_mb'] / large['single_mb']:.3f} target={TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
