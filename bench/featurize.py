#!/usr/bin/env python
"""Featurization throughput: the Ray Data path vs a plain in-process loop doing the same work,
compared by their *marginal* rates between two corpus sizes (Ray's fixed start-up excluded).

    python bench/featurize.py                   # sizes 10 and 30 utterances/dialog (~5 and ~15 min of audio),
                                                # fbank + a random-init HuBERT-base (CPU: ~15 min on 2 quiet cores)
    python bench/featurize.py --quick           # sizes 2 and 4, fbank + a random-init *tiny* HuBERT (validation only)
    python bench/featurize.py --encoder /models/hubert-large --gpu       # a local HF model on CUDA
    python bench/featurize.py --plain-threads 1 # the plain loop with as many torch threads as the encoder actor

For every corpus size (a synthetic corpus in IEMOCAP layout, demo preset, made in a temp dir, plus
its four-class manifest) and every encoder (``fbank``, and ``--encoder``: by default
``random-hubert-base``, a random-init HuBERT with base sizes (12 x 768) made here with
``transformers``: the real model's compute, no download), two paths, each in its own subprocess:

* **plain**: one process, ``EncodeBatch`` (the same callable Ray runs) over the same length-bucketed
  batches (``serray.data.features.featurize._bucketed_blocks``), the rows written with pyarrow as Parquet
  partitioned by session, then the same per-session statistics pass that ``featurize`` makes
  (``serray.data.features.featurize._session_stats`` runs it on Ray Data, ``session_stats_local`` in-process). Timed: manifest read -> blocks -> encoder build ->
  encode -> write -> statistics.
* **ray**: ``serray.data.features.featurize.featurize(cfg)`` into a fresh directory. ``ray.init`` runs before
  the clock starts; everything else (actor start, encoder build in the actor, Ray Data execution,
  Parquet write, bookkeeping, the statistics pass) is timed.

So both paths do the same work, the statistics pass included on both sides.

**Marginal rate** of a path and encoder = (audio_large - audio_small) / (time_large - time_small) in
audio-seconds per second: the cost of each extra second of audio, with the fixed start-up (Ray
Data planning, actor start and encoder build, first-batch latency; for plain the encoder build)
cancelled out. The fixed start-up is printed as the intercept
``time_small - audio_small / marginal_rate``. The larger size should hold >= 10 min of audio
(the default's does, ~15 min) so that the difference is not noise; a warning is printed otherwise.

The last line is ``RESULT featurize ratio=<marginal ray / marginal plain with --encoder> target=0.85``
(the compute-bound encoder, where featurization time matters); fbank's marginal ratio and both
intercepts are printed beside it, as are the whole-run rates at each size.

Memory: ``ru_maxrss`` of the process (plain; Ray driver), plus, for Ray, the peak RSS (VmHWM from
/proc, sampled every 0.1 s) of the Ray *worker* processes it started (encoder actor, write tasks,
idle pre-started workers) and of Ray's system processes (raylet, GCS, dashboard...), each summed.
Shared pages are counted in every process that maps them, so the sums overstate.

Threads: the plain loop uses torch's default thread count unless ``--plain-threads``; the encoder
actor gets what Ray gives a worker with ``features.num_cpus`` CPUs (``OMP_NUM_THREADS``); both are
printed (probed in a task with the actor's resources, outside the clock).

Full command (quiet machine; the lead's): ``python bench/featurize.py --repeat 2`` (about 30 min on
2 cores: HuBERT-base runs at ~5 audio-s/s there, ~20 min of audio per path and repeat; ``--repeat 1``
halves it). ``--plain-threads 1`` gives the plain loop the encoder actor's single thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import RAY_ENV, ProcSampler, load_line, make_random_hubert  # noqa: E402
from bench._common import maxrss_mb as _maxrss_mb  # noqa: E402

TARGET = 0.85
MIN_LARGE_AUDIO_S = 600.0
RANDOM_HUBERT = "random-hubert-base"
RANDOM_PREFIX = "random-hubert-"  # random-hubert-{tiny,base,large}


# ---------------------------------------------------------------------------- child: one measurement


def _child_cfg(args):
    from serray.config import load_config

    return load_config(None, [f"output_dir={args.out}", f"data.root={args.root}",
                              f"data.manifest={args.manifest}", f"features.dir={args.out}/features",
                              "ray.progress_bars=false", *args.override])


def child_plain(args) -> dict:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from serray.config import as_dict
    from serray.data.features.featurize import EncodeBatch, _bucketed_blocks, actor_pool_bounds, session_stats_local
    from serray.data.corpora.base import MANIFEST_COLUMNS, read_manifest

    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    cfg = _child_cfg(args)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    manifest = read_manifest(cfg.data.manifest)
    manifest = manifest[manifest["session"].isin(list(cfg.data.sessions))]
    pool = actor_pool_bounds(cfg.features, {"CPU": float(args.num_cpus)})  # the Ray run's blocks, the same files
    blocks = _bucketed_blocks(manifest[MANIFEST_COLUMNS], cfg.features.batch_size, 4 * pool[1])
    fn = EncodeBatch(as_dict(cfg.encoder), cfg.features.min_seconds)
    t_built = time.perf_counter()
    out_dir = Path(cfg.features.dir)
    rows, bs, t_encode, frames = 0, cfg.features.batch_size, 0.0, 0
    for b, block in enumerate(blocks):
        te = time.perf_counter()
        parts = [fn(block.iloc[i: i + bs].reset_index(drop=True)) for i in range(0, len(block), bs)]
        t_encode += time.perf_counter() - te
        done = pd.concat(parts, ignore_index=True)
        rows += len(done)
        frames += int(done["num_frames"].sum())
        for session, part in done.groupby("session"):  # one file per block and partition, like Ray
            d = out_dir / f"session={session}"
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(part.drop(columns="session"), preserve_index=False),
                           d / f"block{b:04d}.parquet")
    t_stats = time.perf_counter()
    session_stats_local(str(out_dir), sorted(int(s) for s in manifest["session"].unique()))  # the statistics featurize() makes too
    seconds = time.perf_counter() - t0
    return {"path": "plain", "seconds": seconds, "rows": rows, "frames": frames,
            "audio_s": float(manifest["duration"].sum()), "encoder_build_s": t_built - t0, "encode_s": t_encode,
            "stats_s": time.perf_counter() - t_stats, "blocks": len(blocks), "torch_threads": torch.get_num_threads(),
            "rss_base_mb": round(rss0, 1), "rss_peak_mb": round(_maxrss_mb(), 1)}


def _actor_threads(cfg) -> dict:
    """torch threads and OMP_NUM_THREADS in a Ray worker with the encoder actor's resources."""
    import ray

    @ray.remote(num_cpus=cfg.features.num_cpus, num_gpus=cfg.features.num_gpus)
    def probe():
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(probe.remote())


def child_ray(args) -> dict:
    import ray

    from serray.data.features.featurize import featurize, read_meta, stored_utterances
    from serray.data.corpora.base import read_manifest

    cfg = _child_cfg(args)
    ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=args.verbose,
             logging_level="INFO" if args.verbose else "WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    threads = _actor_threads(cfg)
    time.sleep(1.0)  # let the pre-started workers and dashboard settle outside the clock
    rss0 = _maxrss_mb()
    with ProcSampler() as sampler:
        t0 = time.perf_counter()
        summary = featurize(cfg)
        seconds = time.perf_counter() - t0
    manifest = read_manifest(cfg.data.manifest)
    manifest = manifest[manifest["session"].isin(list(cfg.data.sessions))]
    meta = read_meta(cfg.features.dir)
    frames = int(stored_utterances(cfg.features.dir, columns=("num_frames",))["num_frames"].sum())
    ray.shutdown()
    return {"path": "ray", "seconds": seconds, "rows": summary["written"], "skipped": summary["skipped"],
            "frames": frames, "audio_s": float(manifest["duration"].sum()), "stored": meta["num_rows"],
            "actor_threads": threads, "rss_base_mb": round(rss0, 1), "rss_peak_mb": round(_maxrss_mb(), 1),
            **sampler.summary()}


def run_child(kind: str, root: Path, manifest: Path, overrides, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"serray-bench-{kind}-") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(root),
               "--manifest", str(manifest), "--out", out, "--num-cpus", str(args.num_cpus),
               *(["--verbose"] if args.verbose else []), *[f"--override={o}" for o in overrides],
               *([f"--plain-threads={args.plain_threads}"] if args.plain_threads else [])]
        env = {**os.environ, **RAY_ENV,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("RAY_ADDRESS", None)  # a bench starts its own local Ray: never join someone else's
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        if args.verbose and proc.stderr:
            sys.stderr.write(proc.stderr[-4000:])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"bench child {kind} failed with status {proc.returncode}")
        return json.loads(lines[-1][len("BENCH "):])


# ---------------------------------------------------------------------------- parent


def make_data(base: Path, per_dialog: int) -> tuple:
    from bench._common import make_corpus_and_manifest

    root, manifest, kept = make_corpus_and_manifest(base / f"upd{per_dialog}", keep_unlabelled=False,
                                                    seed=0, utterances_per_dialog=per_dialog)
    return root, manifest, len(kept), float(kept["duration"].sum())


def best(results: list) -> dict:
    return min(results, key=lambda r: r["seconds"])


def fmt_row(label: str, r: dict) -> str:
    rate = r["audio_s"] / r["seconds"]
    if r["path"] == "plain":
        mem = f"peak {r['rss_peak_mb']:.0f} MB (base {r['rss_base_mb']:.0f})"
        extra = (f"enc {r['encode_s']:.2f}s, build {r['encoder_build_s']:.2f}s, stats {r['stats_s']:.2f}s, "
                 f"{r['torch_threads']} thr")
    else:
        mem = (f"driver {r['rss_peak_mb']:.0f} MB; workers {r['workers_mb']:.0f} MB/{r['n_workers']} "
               f"(encoder actor {r['encoder_actor_mb']:.0f}); ray system {r['system_mb']:.0f} MB/{r['n_system']}")
        extra = f"stored {r['stored']}, skipped {r['skipped']}, actor {r['actor_threads']['torch_threads']} thr"
    return f"{label:<24} {r['path']:<6} {r['rows']:>5} {r['audio_s']:>8.1f} {r['seconds']:>8.2f} {rate:>9.2f}  {mem}; {extra}"


def marginal(small: dict, large: dict) -> dict:
    """Marginal rate (audio-s per s between the two sizes) and the fixed start-up (intercept, s)."""
    da, dt = large["audio_s"] - small["audio_s"], large["seconds"] - small["seconds"]
    rate = da / dt if dt > 0 and da > 0 else float("nan")
    intercept = small["seconds"] - small["audio_s"] / rate if rate == rate else float("nan")
    return {"rate": rate, "intercept": intercept, "d_audio": da, "d_time": dt}


def resolve_encoder(name: str, tmp: Path) -> str:
    if name.startswith(RANDOM_PREFIX):
        size = name[len(RANDOM_PREFIX):]
        return make_random_hubert(tmp / name, size)
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 2 and 4 utterances/dialog and a tiny random HuBERT "
                   "(validates the code paths; its ratio means nothing)")
    p.add_argument("--sizes", default=None, help="two corpus sizes in utterances per dialog, comma-separated "
                   "(default 10,30; --quick 2,4)")
    p.add_argument("--repeat", type=int, default=1, help="runs per path, encoder and size; the fastest is used")
    p.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...) of the Ray runs")
    p.add_argument("--batch-size", type=int, default=None, help="features.batch_size (default: config's)")
    p.add_argument("--concurrency", type=int, default=None, help="features.concurrency (encoder actors)")
    p.add_argument("--actor-cpus", type=float, default=None, help="features.num_cpus per encoder actor")
    p.add_argument("--encoder", default=None, help="the compute-bound encoder of the RESULT: a Hugging Face model "
                   f"(local directory) or '{RANDOM_PREFIX}{{tiny,base,large}}', made here with random weights "
                   f"(default {RANDOM_HUBERT}; --quick {RANDOM_PREFIX}tiny)")
    p.add_argument("--gpu", action="store_true", help="run --encoder on CUDA (features.num_gpus=1)")
    p.add_argument("--plain-threads", type=int, default=None, help="torch threads of the plain loop (default: torch's)")
    p.add_argument("--override", action="append", default=[], help="extra config override key=value")
    p.add_argument("--verbose", action="store_true")
    # child mode (internal)
    p.add_argument("--child", choices=["plain", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        if args.child == "ray" and not args.verbose:
            import logging

            logging.getLogger("serray").setLevel(logging.WARNING)
        res = child_plain(args) if args.child == "plain" else child_ray(args)
        print("BENCH " + json.dumps(res), flush=True)
        return 0

    sizes = [int(s) for s in (args.sizes or ("2,4" if args.quick else "10,30")).split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        p.error("--sizes takes two sizes, smaller first")
    encoder = args.encoder or (RANDOM_PREFIX + "tiny" if args.quick else RANDOM_HUBERT)
    overrides = list(args.override)
    if args.batch_size:
        overrides.append(f"features.batch_size={args.batch_size}")
    if args.concurrency:
        overrides.append(f"features.concurrency={args.concurrency}")
    if args.actor_cpus is not None:
        overrides.append(f"features.num_cpus={args.actor_cpus}")
    import torch

    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        raise SystemExit("--gpu given but torch sees no CUDA device")
    print(f"# featurize bench: {load_line()}, torch {torch.__version__}, cuda={cuda}, ray num_cpus={args.num_cpus}, "
          f"sizes {sizes} utterances/dialog, encoders fbank + {encoder}{' (CUDA)' if args.gpu else ''}, "
          f"repeat {args.repeat}, plain threads {args.plain_threads or 'torch default'}, overrides={overrides or '-'}",
          flush=True)

    header = f"{'encoder / corpus':<24} {'path':<6} {'rows':>5} {'audio_s':>8} {'wall_s':>8} {'audio_s/s':>9}  memory; notes"
    lines, res = [], {}
    with tempfile.TemporaryDirectory(prefix="serray-bench-") as tmp:
        data = {}
        for size in sizes:
            t = time.perf_counter()
            data[size] = make_data(Path(tmp), size)
            _, _, n, audio = data[size]
            print(f"# corpus utterances_per_dialog={size}: {n} four-class utterances, {audio:.1f} s of audio "
                  f"(made in {time.perf_counter() - t:.1f} s)", flush=True)
        enc_path = resolve_encoder(encoder, Path(tmp))
        hf = [f"encoder.name={enc_path}", "encoder.local_files_only=true", f"encoder.device={'cuda' if args.gpu else 'cpu'}"]
        if args.gpu:
            hf += ["features.num_gpus=1"]
        for enc, enc_over in (("fbank", []), (encoder, hf)):
            for size in sizes:
                root, manifest, n, _ = data[size]
                for kind in ("plain", "ray"):
                    res[(enc, size, kind)] = best([run_child(kind, root, manifest, overrides + enc_over, args)
                                                   for _ in range(args.repeat)])
                label = f"{enc[:18]} upd={size}"
                lines += [fmt_row(label, res[(enc, size, 'plain')]), fmt_row(label, res[(enc, size, 'ray')])]
                print("\n".join(lines[-2:]), flush=True)

    print()
    print(header)
    print("-" * len(header))
    print("\n".join(lines))
    print()
    small, large = sizes
    print(f"marginal rates between upd={small} and upd={large} (audio-s per s; fixed start-up = intercept):")
    head = (f"{'encoder':<22} {'path':<6} {'audio S/L (s)':>15} {'wall S/L (s)':>15} {'marginal':>9} {'start-up s':>10} "
            f"{'whole-run rate S/L':>19}")
    print(head)
    print("-" * len(head))
    ratios = {}
    for enc in ("fbank", encoder):
        m = {}
        for kind in ("plain", "ray"):
            a, b = res[(enc, small, kind)], res[(enc, large, kind)]
            m[kind] = marginal(a, b)
            print(f"{enc[:22]:<22} {kind:<6} {a['audio_s']:>7.0f}/{b['audio_s']:<7.0f} {a['seconds']:>7.1f}/{b['seconds']:<7.1f} "
                  f"{m[kind]['rate']:>9.2f} {m[kind]['intercept']:>10.1f} "
                  f"{a['audio_s'] / a['seconds']:>9.2f}/{b['audio_s'] / b['seconds']:<9.2f}")
        ratios[enc] = m["ray"]["rate"] / m["plain"]["rate"]
        whole = (res[(enc, large, "ray")]["audio_s"] / res[(enc, large, "ray")]["seconds"]) / \
                (res[(enc, large, "plain")]["audio_s"] / res[(enc, large, "plain")]["seconds"])
        print(f"{'':<22} ratio ray/plain: marginal {ratios[enc]:.3f}, whole run at upd={large} {whole:.3f}; "
              f"fixed start-up ray {m['ray']['intercept']:.1f} s vs plain {m['plain']['intercept']:.1f} s")
    large_audio = res[("fbank", large, "plain")]["audio_s"]
    if large_audio < MIN_LARGE_AUDIO_S:
        print(f"WARNING: the larger corpus holds {large_audio / 60:.1f} min of audio (< {MIN_LARGE_AUDIO_S / 60:.0f} min): "
              "the marginal rates are dominated by noise; use the default sizes for a number")
    thr = res[(encoder, large, "ray")]["actor_threads"]
    print(f"threads: plain {res[(encoder, large, 'plain')]['torch_threads']}, encoder actor {thr['torch_threads']} "
          f"(OMP_NUM_THREADS={thr['OMP_NUM_THREADS']}, features.num_cpus per actor); {load_line()} at the end")
    why = "" if math.isfinite(ratios["fbank"]) else (": a path was not slower on the larger corpus, its extra work is "
                                                     "below the run-to-run noise")
    print(f"fbank marginal ratio ray/plain = {ratios['fbank']:.3f} (reference, not the RESULT{why})")
    r = ratios[encoder]
    print(f"RESULT featurize ratio={r:.3f} target={TARGET}" if math.isfinite(r) else f"RESULT featurize ratio=nan target={TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
