#!/usr/bin/env python
"""Pre-training throughput: the Ray Train streaming path vs a plain in-memory loop doing the same work.

    python bench/pretrain.py                 # 20 utterances/dialog (~340 kept), 6 epochs
    python bench/pretrain.py --quick         # 6 utterances/dialog, 3 epochs
    python bench/pretrain.py --epochs 8 --d-model 256

Set-up (not timed): a synthetic corpus in IEMOCAP layout, its manifest and fbank features in a temp dir
(``serray.data.prepare.prepare_corpus`` + ``serray.data.features.featurize.featurize``).

* **ray**: ``serray.train.pretrain.run_pretrain(cfg, force=True)`` (1 worker, ``cpus_per_worker`` 0.5:
  the config's ``pretrain`` section). ``ray.init`` runs before the clock. Two numbers: the in-worker
  ``frames_per_s`` of every epoch from ``history.json`` (clock from ``iter_torch_batches`` to the end
  of the last step: includes each epoch's Ray Data execution start-up and the collate, excludes the
  checkpoint/report), and the wall clock of the whole ``run_pretrain`` call (trainer and worker
  start-up, every epoch, checkpoints, export) turned into frames/s over all epochs' frames.
* **plain**: one process, no Ray running: ``serray.train.loop.run_loop`` (the loop every Ray Train
  worker runs) with a ``LocalRuntime`` on the same rows (``serray.train.pretrain.pretrain_inputs``, the
  function ``run_pretrain`` builds its inputs with): the same ``Adapter``, AdamW groups, schedules, seeded
  per-epoch shuffle, crop seeds and span-mask seeds, so both paths do identical arithmetic (the
  final-epoch losses match). torch threads are set to what a Ray Train worker has (probed with a tiny
  TorchTrainer on the same ScalingConfig); ``--plain-default-threads`` also runs the plain loop with
  the process's default thread count, for reference. The ray path forces ``pretrain.backend=ray``
  (a one-worker run would otherwise use the in-process backend, which is this plain loop).

Other people's load on the machine is shown per phase (CPU used by this process and everything it
started vs by the rest of the box, from /proc), and a CPU-normalised ratio (frames per CPU-second of
the RayTrainWorker process over the whole fit vs of the plain process) is printed as a check that does
not depend on that load.

Frames are counted as in ``serray.train.loop``: non-padded frames after the crop. The ratio uses the
steady-state epochs only (epoch 0 skipped on both paths: first Ray Data execution, first-step
allocations): total frames / total epoch seconds over epochs 1..E-1, ray over plain. The last line is
``RESULT pretrain ratio=<ray/plain> target=0.8``.

On a CUDA machine it also times a 3-layer d=1024 adapter training step (bf16 autocast, B x T frames,
no padding) and reports frames/s and achieved TFLOP/s (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``, with an analytic estimate beside it). Reference: about
1.0 M frames/s was measured on one H100. Without CUDA this part is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from bench._common import LoadMonitor, start_ray  # noqa: E402  (shared with bench/scale.py)

TARGET = 0.8


def _quiet(*_a, **_k) -> None:
    pass


# ---------------------------------------------------------------------------- set-up


def make_cfg(out: Path, args):
    from serray.config import load_config

    d = args.d_model
    overrides = [f"output_dir={out}", "ray.progress_bars=false", "pretrain.backend=ray", "pretrain.per_fold=false",
                 f"synthetic.utterances_per_dialog={args.utterances_per_dialog}",
                 f"pretrain.epochs={args.epochs}"]
    if d is not None:
        overrides += [f"adapter.d_model={d}", f"adapter.ff_dim={2 * d}"]
    if args.batch_size:
        overrides.append(f"pretrain.batch_size={args.batch_size}")
    if args.num_cpus:
        overrides.append(f"ray.num_cpus={args.num_cpus}")
    return load_config(None, overrides + list(args.override))


def plain_inputs(cfg):
    """What ``run_pretrain`` trains on, built by the same function (``pretrain_inputs``): the loop
    config and the rows, held in this process."""
    from serray.train.pretrain import pretrain_inputs

    loop_config, data = pretrain_inputs(cfg)
    return {**loop_config, "data_mode": "memory", "num_workers": 1}, data.rows()


# ---------------------------------------------------------------------------- ray path


def probe_worker_threads(cfg) -> dict:
    """torch threads and OMP_NUM_THREADS inside a Ray Train worker on the same ScalingConfig."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(cfg.output_dir) / "thread_probe"
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "threads.json"

    def probe(config):
        import json as _json
        import os as _os

        import torch as _torch

        Path(config["marker"]).write_text(_json.dumps({
            "torch_threads": _torch.get_num_threads(), "interop_threads": _torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS"), "pid": _os.getpid()}))
        ray.train.report({"ok": 1})

    t = cfg.pretrain
    TorchTrainer(probe, train_loop_config={"marker": str(marker)},
                 scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                              resources_per_worker={"CPU": t.cpus_per_worker}),
                 run_config=RunConfig(storage_path=str(out / "ray"), name="probe")).fit()
    return json.loads(marker.read_text())


def run_ray(cfg) -> dict:
    from serray.train.pretrain import run_pretrain

    t0 = time.perf_counter()
    summary = run_pretrain(cfg, force=True)
    wall = time.perf_counter() - t0
    history = json.loads((Path(cfg.pretrain.dir) / "history.json").read_text())
    return {"wall_s": wall, "history": history, "summary": summary}


# ---------------------------------------------------------------------------- plain path


def run_plain(loop_config: dict, rows, threads: int) -> dict:
    """``serray.train.loop.run_loop`` (the loop every Ray Train worker runs) in this process on the same
    rows: same model, optimiser, schedules, seeded shuffle and mask seeds, so the arithmetic matches."""
    import torch

    from serray.train.loop import LocalRuntime, run_loop
    from serray.train.pretrain import PretrainTask

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t_start, c_start = time.perf_counter(), time.process_time()
        history = run_loop(PretrainTask(loop_config), loop_config, LocalRuntime({"train": rows}))
        for h in history:  # the loop's clock: the epoch's steps (collate included), not the report
            h["seconds"] = h["frames_per_s"] and rows_frames(rows, loop_config) / h["frames_per_s"]
        return {"wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start, "history": history,
                "threads": threads}
    finally:
        torch.set_num_threads(prev)


def rows_frames(rows, loop_config) -> int:
    """Non-padded frames of one epoch after the ``max_frames`` crop (as the loop counts them)."""
    m = loop_config.get("max_frames")
    lengths = rows.lengths()
    return int(sum(min(int(t), m) if m else int(t) for t in lengths))


# ---------------------------------------------------------------------------- GPU step


def _analytic_step_flops(B: int, T: int, D: int, d: int, ff: int, layers: int, K: int, mask_ratio: float) -> float:
    """Matmul FLOPs of one pre-training step: student fwd+bwd (3x fwd), teacher fwd, heads on masked frames."""
    n = B * T
    per_layer = n * (2 * 4 * d * d + 2 * 2 * d * ff) + B * 2 * 2 * T * T * d  # projections + FFN + QK^T, AV
    wap = n * 2 * D * d + layers * per_layer
    m = n * mask_ratio
    heads = m * 2 * d * (D + d + K)
    kmeans = n * 2 * d * K * 2  # assignment for update and for targets
    return 3 * wap + wap + 3 * heads + kmeans


def gpu_step_bench(d_model: int, batch: int, frames: int, steps: int) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from torch.utils.flop_counter import FlopCounterMode

    from serray.models.adapter import Adapter
    from serray.train.schedules import cosine_schedule

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    D, L, heads, ff, K = 1024, 3, 16, 4 * d_model, 64  # HuBERT-large features into a 3-layer adapter
    torch.manual_seed(0)
    model = Adapter(input_dim=D, d_model=d_model, num_layers=L, num_heads=heads, ff_dim=ff, num_clusters=K).to(dev)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    x = torch.randn(batch, frames, D, device=dev)
    pad = torch.zeros(batch, frames, dtype=torch.bool, device=dev)

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, pad, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        model.update_teacher(cosine_schedule(0.996, 0.9999, 1000, 0, i))

    model.train()
    for i in range(3):  # warm-up (cuBLAS handles, allocator)
        step(i)
    counter = FlopCounterMode(display=False)
    with counter:
        step(3)
    counted = float(counter.get_total_flops())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(4 + i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    analytic = _analytic_step_flops(batch, frames, D, d_model, ff, L, K, model.mask_ratio)
    return {"device": torch.cuda.get_device_name(0), "d_model": d_model, "batch": batch, "frames": frames,
            "step_ms": dt * 1e3, "frames_per_s": batch * frames / dt, "flops_counted": counted,
            "flops_analytic": analytic, "tflops_counted": counted / dt / 1e12, "tflops_analytic": analytic / dt / 1e12}


# ---------------------------------------------------------------------------- report


def steady(history: list, frames_per_epoch: int | None = None) -> tuple[float, int]:
    """frames/s over epochs >= 1 (total frames / total seconds); falls back to all epochs if only one."""
    h = [e for e in history if e["epoch"] >= 1] or history
    frames = sum(e.get("frames", frames_per_epoch) for e in h)
    seconds = sum(e.get("seconds", (e.get("frames", frames_per_epoch)) / e["frames_per_s"]) for e in h)
    return frames / max(1e-9, seconds), len(h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small corpus (6 utterances/dialog) and 3 epochs")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default 6; --quick 3; >= 2)")
    p.add_argument("--d-model", type=int, default=None, help="adapter.d_model (ff_dim = 2 x d_model; default: config's)")
    p.add_argument("--utterances-per-dialog", type=int, default=None, help="corpus size (default 20; --quick 6)")
    p.add_argument("--batch-size", type=int, default=None, help="pretrain.batch_size (default: config's)")
    p.add_argument("--num-cpus", type=int, default=None, help="ray.num_cpus (default: all cores)")
    p.add_argument("--plain-threads", type=int, default=None,
                   help="torch threads of the plain loop used for the ratio (default: probed from a Ray Train worker)")
    p.add_argument("--plain-default-threads", action="store_true",
                   help="also run the plain loop with the process's default torch thread count (reference only; "
                        "slow on a busy machine: OpenMP threads spin while waiting for a descheduled sibling)")
    p.add_argument("--no-probe", action="store_true", help="skip the worker thread probe (assume OMP_NUM_THREADS=1)")
    p.add_argument("--gpu-d-model", type=int, default=1024, help="width of the CUDA step bench")
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-frames", type=int, default=300)
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--override", action="append", default=[], help="extra config override key=value")
    p.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 6)
    args.utterances_per_dialog = args.utterances_per_dialog or (6 if args.quick else 20)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epoch 0 is excluded from the ratio)")

    import torch

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        logging.getLogger("serray").setLevel(logging.WARNING)
    cuda = torch.cuda.is_available()
    load = os.getloadavg()
    default_threads = torch.get_num_threads()
    print(f"# pretrain bench: {os.cpu_count()} cores, load avg {load[0]:.1f}/{load[1]:.1f}, torch {torch.__version__} "
          f"(default {default_threads} threads), cuda={cuda}", flush=True)

    import ray

    from serray.data.features.featurize import featurize
    from serray.data.prepare import prepare_corpus

    tmp_ctx = tempfile.TemporaryDirectory(prefix="serray-bench-pretrain-") if args.keep is None else None
    work = Path(tmp_ctx.name if tmp_ctx else args.keep).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg = make_cfg(work, args)
        t = time.perf_counter()
        init_s = start_ray(cfg)  # one Ray for set-up and the Ray path (a second start is slow on a busy box)
        report = prepare_corpus(cfg, echo=_quiet)
        featurize(cfg)
        loop_config, rows = plain_inputs(cfg)
        max_frames = cfg.pretrain.max_frames
        lengths = [int(t_) for t_ in rows.lengths()]
        frames_per_epoch = rows_frames(rows, loop_config)
        feat_mb = sum(len(x) for x in rows.columns["feat"]) / 2**20
        mcfg = loop_config["model"]
        print(f"# set-up {time.perf_counter() - t:.1f} s: {len(report.kept)} utterances, {len(lengths)} rows, "
              f"{feat_mb:.1f} MB of float16 features (D={mcfg['input_dim']}), {frames_per_epoch} frames/epoch "
              f"(max_frames={max_frames}); adapter d_model={mcfg['d_model']} ff={mcfg['ff_dim']} layers={mcfg['num_layers']} "
              f"heads={mcfg['num_heads']} K={mcfg['num_clusters']}; batch {cfg.pretrain.batch_size}, "
              f"{loop_config['steps_per_epoch']} steps/epoch x {cfg.pretrain.epochs} epochs; "
              f"{cfg.pretrain.num_workers} worker x {cfg.pretrain.cpus_per_worker} CPU; "
              f"features.cache_max_mb={cfg.features.cache_max_mb} "
              f"({'materialized in the object store' if feat_mb <= cfg.features.cache_max_mb else 'streamed from Parquet'})",
              flush=True)

        # --- ray (the Ray instance of the set-up: ray.init is not timed, as for `serray pipeline`)
        time.sleep(1.0)  # let the set-up's workers settle outside the clock
        with LoadMonitor() as mon_ray:
            res_ray = run_ray(cfg)
        print(f"# ray: ray.init {init_s:.1f} s (not timed); run_pretrain: {mon_ray.line()}", flush=True)
        print(f"# ray: CPU-s by process during run_pretrain: {mon_ray.breakdown()}", flush=True)
        probe = None
        if not args.no_probe:
            try:
                probe = probe_worker_threads(cfg)
                print(f"# Ray Train worker: torch.get_num_threads()={probe['torch_threads']}, "
                      f"interop={probe['interop_threads']}, OMP_NUM_THREADS={probe['OMP_NUM_THREADS']}", flush=True)
            except Exception as e:  # the probe is a convenience: the benchmark stands without it
                print(f"# thread probe failed ({type(e).__name__}: {e}); assuming 1 thread", flush=True)
        ray.shutdown()
        worker_threads = args.plain_threads or (probe["torch_threads"] if probe else 1)

        # --- plain (Ray is shut down: nothing else of ours runs)
        with LoadMonitor() as mon_plain:
            res_plain = run_plain(loop_config, rows, worker_threads)
        print(f"# plain, {worker_threads} thread(s): {mon_plain.line()}", flush=True)
        res_plain_default = None
        if default_threads != worker_threads and args.plain_default_threads:
            with LoadMonitor() as mon:
                res_plain_default = run_plain(loop_config, rows, default_threads)
            print(f"# plain, {default_threads} threads (reference): {mon.line()}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp_ctx:
            tmp_ctx.cleanup()

    # --- GPU
    gpu = gpu_step_bench(args.gpu_d_model, args.gpu_batch, args.gpu_frames, args.gpu_steps) if cuda else None

    # --- table
    hist_ray = res_ray["history"]
    ray_fps, n_steady = steady(hist_ray, frames_per_epoch)
    plain_fps, _ = steady(res_plain["history"], frames_per_epoch)
    ratio = ray_fps / plain_fps
    total_frames = frames_per_epoch * len(hist_ray)
    ray_steps = hist_ray[-1]["step"]
    plain_steps = res_plain["history"][-1]["step"]
    print()
    print("per-epoch frames/s (ray: in-worker frames_per_s from history.json; plain: same clock, same count)")
    header = f"{'epoch':>5} {'ray fr/s':>10} {'ray s':>7} {'plain fr/s':>11} {'plain s':>8} {'plain fr/cpu-s':>14}"
    if res_plain_default:
        header += f" {f'plain {default_threads}thr':>12}"
    print(header)
    print("-" * len(header))
    for i, e in enumerate(hist_ray):
        pe = res_plain["history"][i]
        line = (f"{e['epoch']:>5} {e['frames_per_s']:>10.0f} {frames_per_epoch / e['frames_per_s']:>7.2f} "
                f"{pe['frames_per_s']:>11.0f} {pe['seconds']:>8.2f} {'-':>14}")
        if res_plain_default:
            line += f" {res_plain_default['history'][i]['frames_per_s']:>12.0f}"
        print(line)
    print()
    rows_out = [
        ("ray, in-worker, steady (ep 1..)", ray_fps, f"{n_steady} epochs, Ray Data start-up per epoch included"),
        ("ray, in-worker, all epochs", steady([{**e, "epoch": 1} for e in hist_ray], frames_per_epoch)[0], ""),
        ("ray, wall of run_pretrain", total_frames / res_ray["wall_s"],
         f"{res_ray['wall_s']:.1f} s: trainer start, {len(hist_ray)} epochs, checkpoints, export"),
        (f"plain, {worker_threads} thread(s), steady", plain_fps, "the ratio's denominator"),
        (f"plain, {worker_threads} thread(s), wall", total_frames / res_plain["wall_s"],
         f"{res_plain['wall_s']:.1f} s incl. model build"),
    ]
    worker_cpu = mon_ray.cpu_of("ray::RayTrainWorker")
    if worker_cpu > 0:
        rows_out.append(("ray, per worker CPU-second", total_frames / worker_cpu,
                         f"{worker_cpu:.1f} CPU-s in the RayTrainWorker over the fit (start-up included)"))
    rows_out.append((f"plain, {worker_threads} thread(s), per CPU-second", total_frames / res_plain["cpu_s"],
                     f"{res_plain['cpu_s']:.1f} CPU-s in the process over the run"))
    if res_plain_default:
        rows_out.append((f"plain, {default_threads} threads, steady", steady(res_plain_default["history"], frames_per_epoch)[0], "reference only"))
    header = f"{'path':<34} {'frames/s':>10}  notes"
    print(header)
    print("-" * 78)
    for name, fps, note in rows_out:
        print(f"{name:<34} {fps:>10.0f}  {note}")
    print(f"steps: ray {ray_steps}, plain {plain_steps}; final-epoch loss: ray {hist_ray[-1]['loss']:.4f}, "
          f"plain {res_plain['history'][-1]['loss']:.4f}")
    print(f"threads: Ray Train worker {probe['torch_threads'] if probe else '?'} "
          f"(OMP_NUM_THREADS={probe['OMP_NUM_THREADS'] if probe else '?'}), plain {worker_threads}")
    med = lambda h: statistics.median(e["frames_per_s"] for e in h if e["epoch"] >= 1)  # noqa: E731
    print(f"load: ray phase {mon_ray.line()}; plain phase {mon_plain.line()}")
    print(f"median steady epoch: ray {med(hist_ray):.0f}, plain {med(res_plain['history']):.0f} frames/s "
          f"-> ratio {med(hist_ray) / med(res_plain['history']):.3f} (a check against bursts of load; not the RESULT)")
    if worker_cpu > 0:
        print(f"CPU-normalised ratio (frames per CPU-second of the training process, whole run) = "
              f"{res_plain['cpu_s'] / worker_cpu:.3f} (insensitive to other load on the box; not the RESULT)")
    print(f"ratio ray/plain (steady-state in-worker frames/s, epochs 1..{len(hist_ray) - 1}) = {ratio:.3f} "
          f"(target {TARGET}); wall-clock ratio = {(total_frames / res_ray['wall_s']) / (total_frames / res_plain['wall_s']):.3f}")
    print()
    if gpu is None:
        print("# GPU step bench skipped: torch.cuda.is_available() is False on this machine "
              f"(would time a {3}-layer d={args.gpu_d_model} adapter step; H100 reference ~1.0 M frames/s)")
    else:
        print(f"# GPU step bench on {gpu['device']}: 3-layer d={gpu['d_model']} adapter, batch {gpu['batch']} x "
              f"{gpu['frames']} frames, bf16 autocast")
        print(f"  step {gpu['step_ms']:.2f} ms, {gpu['frames_per_s'] / 1e6:.3f} M frames/s (H100 reference ~1.0 M), "
              f"{gpu['tflops_counted']:.1f} TFLOP/s counted ({gpu['flops_counted'] / 1e9:.1f} GFLOP/step), "
              f"{gpu['tflops_analytic']:.1f} TFLOP/s analytic ({gpu['flops_analytic'] / 1e9:.1f} GFLOP/step)")
    print(f"RESULT pretrain ratio={ratio:.3f} target={TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
