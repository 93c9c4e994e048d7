#!/usr/bin/env python
"""Featurization throughput: the Ray Data path vs a plain in-process loop doing the same work.

    python bench/featurize.py            # corpus sizes 10 and 30 utterances/dialog (200 / 600 utterances)
    python bench/featurize.py --quick    # sizes 4 and 10
    python bench/featurize.py --encoder /models/hubert-large [--gpu]   # also an HF model (local dir)
    python bench/featurize.py --quick --encoder random-hubert-base      # ... or a random-init HuBERT-base

For every corpus size (a synthetic corpus in IEMOCAP layout, made in a temp dir, plus its manifest):

* **plain**: one process, ``EncodeBatch`` (the same callable Ray runs) over the same length-bucketed
  batches (``serray.data.featurize._bucketed_blocks``), then the rows written with pyarrow as Parquet
  partitioned by session. Timed: manifest read -> blocks -> encoder build -> encode -> write.
* **ray**: ``serray.data.featurize.featurize(cfg)`` into a fresh directory. ``ray.init`` runs before
  the clock starts; everything else (actor start, encoder build in the actor, Ray Data execution,
  Parquet write, bookkeeping) is timed.

Each measurement runs in its own subprocess, so peak RSS numbers are clean: ``ru_maxrss`` of that
process (plain; Ray driver), plus, for Ray, the peak RSS (VmHWM from /proc, sampled every 0.1 s) of
the Ray *worker* processes it started (encoder actor, write tasks, idle pre-started workers) and of
Ray's system processes (raylet, GCS, dashboard...), each summed. Shared pages (object store in
/dev/shm, shared libraries) are counted in every process that maps them, so the sums overstate.

Throughput is audio-seconds per wall-second. The last line is
``RESULT featurize ratio=<ray/plain at the larger size> target=0.9``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# ---------------------------------------------------------------------------- /proc helpers


def _proc_children_map() -> dict:
    kids: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list:
    kids, out, todo = _proc_children_map(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcSampler:
    """Peak RSS (VmHWM) of every descendant of this process, sampled in a thread."""

    def __init__(self, period: float = 0.1):
        self.period, self.peak, self.kind = period, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in _descendants(os.getpid()):
            hwm = _vm_hwm_kb(pid)
            if hwm:
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                cmd = _cmdline(pid)
                if cmd:  # a worker renames itself ray::<task> once it runs something
                    self.kind[pid] = cmd

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict:
        workers = {p: kb for p, kb in self.peak.items() if self.kind.get(p, "").startswith("ray::")}
        encoder = {p: kb for p, kb in workers.items() if "EncodeBatch" in self.kind.get(p, "")}
        system = {p: kb for p, kb in self.peak.items() if p not in workers}
        mb = lambda d: round(sum(d.values()) / 1024, 1)  # noqa: E731
        return {"workers_mb": mb(workers), "n_workers": len(workers), "encoder_actor_mb": mb(encoder),
                "system_mb": mb(system), "n_system": len(system)}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    from serray.data.featurize import EncodeBatch, _bucketed_blocks
    from serray.data.iemocap import MANIFEST_COLUMNS, read_manifest

    cfg = _child_cfg(args)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    manifest = read_manifest(cfg.data.manifest)
    manifest = manifest[manifest["session"].isin(list(cfg.data.sessions))]
    blocks = _bucketed_blocks(manifest[MANIFEST_COLUMNS], cfg.features.batch_size, 4 * cfg.features.concurrency)
    fn = EncodeBatch(as_dict(cfg.encoder), cfg.features.min_seconds)
    t_built = time.perf_counter()
    out_dir = Path(cfg.features.dir)
    rows, bs, t_encode = 0, cfg.features.batch_size, 0.0
    for b, block in enumerate(blocks):
        te = time.perf_counter()
        parts = [fn(block.iloc[i: i + bs].reset_index(drop=True)) for i in range(0, len(block), bs)]
        t_encode += time.perf_counter() - te
        done = pd.concat(parts, ignore_index=True)
        rows += len(done)
        for session, part in done.groupby("session"):  # one file per block and partition, like Ray
            d = out_dir / f"session={session}"
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(part.drop(columns="session"), preserve_index=False),
                           d / f"block{b:04d}.parquet")
    seconds = time.perf_counter() - t0
    return {"path": "plain", "seconds": seconds, "rows": rows, "audio_s": float(manifest["duration"].sum()),
            "encoder_build_s": t_built - t0, "encode_s": t_encode, "blocks": len(blocks),
            "torch_threads": torch.get_num_threads(), "rss_base_mb": round(rss0, 1),
            "rss_peak_mb": round(_maxrss_mb(), 1)}


def child_ray(args) -> dict:
    import ray

    from serray.data.featurize import featurize, read_meta
    from serray.data.iemocap import read_manifest

    cfg = _child_cfg(args)
    ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=args.verbose,
             logging_level="INFO" if args.verbose else "WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    time.sleep(1.0)  # let the pre-started workers and dashboard settle outside the clock
    rss0 = _maxrss_mb()
    with ProcSampler() as sampler:
        t0 = time.perf_counter()
        summary = featurize(cfg)
        seconds = time.perf_counter() - t0
    manifest = read_manifest(cfg.data.manifest)
    manifest = manifest[manifest["session"].isin(list(cfg.data.sessions))]
    meta = read_meta(cfg.features.dir)
    ray.shutdown()
    return {"path": "ray", "seconds": seconds, "rows": summary["written"], "skipped": summary["skipped"],
            "audio_s": float(manifest["duration"].sum()), "stored": meta["num_rows"],
            "rss_base_mb": round(rss0, 1), "rss_peak_mb": round(_maxrss_mb(), 1), **sampler.summary()}


def run_child(kind: str, root: Path, manifest: Path, overrides, num_cpus: int, verbose: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"serray-bench-{kind}-") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(root),
               "--manifest", str(manifest), "--out", out, "--num-cpus", str(num_cpus),
               *(["--verbose"] if verbose else []), *[f"--override={o}" for o in overrides]]
        env = {**os.environ, **RAY_ENV}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        if verbose and proc.stderr:
            sys.stderr.write(proc.stderr[-4000:])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"bench child {kind} failed with status {proc.returncode}")
        return json.loads(lines[-1][len("BENCH "):])


# ---------------------------------------------------------------------------- parent


def make_data(base: Path, per_dialog: int) -> tuple:
    from serray.data.iemocap import build_manifest, write_manifest
    from serray.data.synthetic import make_corpus

    root = make_corpus(base / f"upd{per_dialog}" / "IEMOCAP_full_release", seed=0, utterances_per_dialog=per_dialog)
    report = build_manifest(root)
    manifest = write_manifest(report.kept, base / f"upd{per_dialog}" / "manifest.parquet")
    return root, manifest, len(report.kept), float(report.kept["duration"].sum())


def best(results: list) -> dict:
    return min(results, key=lambda r: r["seconds"])


def fmt_row(label: str, r: dict) -> str:
    rate = r["audio_s"] / r["seconds"]
    if r["path"] == "plain":
        mem = f"peak {r['rss_peak_mb']:.0f} MB (base {r['rss_base_mb']:.0f})"
        extra = f"enc {r['encode_s']:.2f}s, build {r['encoder_build_s']:.2f}s, {r['torch_threads']} thr"
    else:
        mem = (f"driver {r['rss_peak_mb']:.0f} MB; workers {r['workers_mb']:.0f} MB/{r['n_workers']} "
               f"(encoder actor {r['encoder_actor_mb']:.0f}); ray system {r['system_mb']:.0f} MB/{r['n_system']}")
        extra = f"stored {r['stored']}, skipped {r['skipped']}"
    return f"{label:<22} {r['path']:<6} {r['rows']:>5} {r['audio_s']:>8.1f} {r['seconds']:>8.2f} {rate:>9.1f}  {mem}; {extra}"


RANDOM_HUBERT = "random-hubert-base"


def make_random_hubert(path: Path) -> str:
    """A random-init HuBERT with base sizes (12 x 768) and large-style layer norm (batchable with an
    attention mask), saved with ``save_pretrained``: the same compute as the real model, no download."""
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True)).eval().save_pretrained(path)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small corpora (4 and 10 utterances per dialog)")
    p.add_argument("--sizes", default=None, help="utterances per dialog, comma-separated (default 10,30)")
    p.add_argument("--repeat", type=int, default=1, help="runs per path and size; the fastest is reported")
    p.add_argument("--num-cpus", type=int, default=2, help="ray.init(num_cpus=...) of the Ray runs")
    p.add_argument("--batch-size", type=int, default=None, help="features.batch_size (default: config's)")
    p.add_argument("--concurrency", type=int, default=None, help="features.concurrency (encoder actors)")
    p.add_argument("--actor-cpus", type=float, default=None, help="features.num_cpus per encoder actor")
    p.add_argument("--encoder", default=None, help="also bench this Hugging Face model (local directory, or "
                   f"'{RANDOM_HUBERT}': a random-init HuBERT-base made here)")
    p.add_argument("--gpu", action="store_true", help="run --encoder on CUDA (features.num_gpus=1)")
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

    sizes = [int(s) for s in (args.sizes or ("4,10" if args.quick else "10,30")).split(",")]
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
    load = os.getloadavg()
    print(f"# featurize bench: {os.cpu_count()} cores, load avg {load[0]:.1f}/{load[1]:.1f}, "
          f"torch {torch.__version__}, cuda={cuda}, ray num_cpus={args.num_cpus}, overrides={overrides or '-'}")

    header = (f"{'corpus':<22} {'path':<6} {'rows':>5} {'audio_s':>8} {'wall_s':>8} {'audio_s/s':>9}  memory; notes")
    lines, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="serray-bench-") as tmp:
        for size in sizes:
            t = time.perf_counter()
            root, manifest, n, audio = make_data(Path(tmp), size)
            print(f"# corpus utterances_per_dialog={size}: {n} kept utterances, {audio:.1f} s of audio "
                  f"(made in {time.perf_counter() - t:.1f} s)", flush=True)
            res = {}
            for kind in ("plain", "ray"):
                res[kind] = best([run_child(kind, root, manifest, overrides, args.num_cpus, args.verbose)
                                  for _ in range(args.repeat)])
            label = f"fbank upd={size} n={n}"
            lines += [fmt_row(label, res["plain"]), fmt_row(label, res["ray"])]
            ratio = res["plain"]["seconds"] / res["ray"]["seconds"]  # == ray rate / plain rate (same audio)
            ratios[size] = ratio
            lines.append(f"{'':<22} ratio ray/plain = {ratio:.3f}")
            print("\n".join(lines[-3:]), flush=True)
        if args.encoder == RANDOM_HUBERT:
            args.encoder = make_random_hubert(Path(tmp) / RANDOM_HUBERT)
        if args.encoder:
            size = sizes[-1]
            root = Path(tmp) / f"upd{size}" / "IEMOCAP_full_release"
            manifest = Path(tmp) / f"upd{size}" / "manifest.parquet"
            enc = [f"encoder.name={args.encoder}", "encoder.local_files_only=true",
                   f"encoder.device={'cuda' if args.gpu else 'cpu'}"]
            if args.gpu:
                enc += ["features.num_gpus=1"]
            if not args.gpu:
                print("# note: --encoder without --gpu runs the model on CPU (slow for large models)")
            res = {k: run_child(k, root, manifest, overrides + enc, args.num_cpus, args.verbose)
                   for k in ("plain", "ray")}
            label = f"{Path(args.encoder).name[:12]} upd={size}"
            lines += [fmt_row(label, res["plain"]), fmt_row(label, res["ray"]),
                      f"{'':<22} ratio ray/plain = {res['plain']['seconds'] / res['ray']['seconds']:.3f}"]

    print()
    print(header)
    print("-" * len(header))
    print("\n".join(lines))
    print(f"RESULT featurize ratio={ratios[sizes[-1]]:.3f} target=0.9")
    return 0


if __name__ == "__main__":
    sys.exit(main())
