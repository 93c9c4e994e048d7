#!/usr/bin/env python
"""The parts of ``bench/gpu.sh`` (read its header for what each prints and how to read it).

    python bench/gpu_bench.py encoder  --work /tmp/serray-gpu [--cpu-smoke]
    python bench/gpu_bench.py adapter  --work /tmp/serray-gpu [--cpu-smoke]
    python bench/gpu_bench.py failover --work /tmp/serray-gpu [--cpu-smoke]
    python bench/gpu_bench.py serve    --work /tmp/serray-gpu [--cpu-smoke]

Each part is one process and ends with one ``SUMMARY <part> {json}`` line; ``gpu.sh`` collects them.
The parts share ``--work``: ``encoder`` saves the random-init HuBERT there (``work/hubert``), which
the other parts use as ``encoder.name`` (each makes it itself if it is missing); ``adapter`` makes
the corpus and features (``work/data``) that ``failover`` reuses (it makes them if missing).
``--cpu-smoke``: tiny sizes on CPU (a 2-layer 64-wide HuBERT with a 32-channel feature extractor, an
80-utterance corpus of 0.6-1.2 s clips, a 32-wide adapter), to check every code path without a GPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

from bench._common import RAY_ENV, hubert_config, load_line  # noqa: E402

H100_ENCODER_REF = 5700.0  # audio-s/s, HuBERT-large forward in bf16 on one H100 (the limit to approach)


def num(x: float) -> str:
    """A rate for a table: no decimals from 100 up, one below (CPU smoke figures are small)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def say(*a) -> None:
    print(*a, flush=True)


def summary(part: str, **kw) -> None:
    print("SUMMARY " + part + " " + json.dumps(kw, default=str), flush=True)


def device_of(args):
    import torch

    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (use --cpu-smoke on a machine without a GPU)")
    return torch.device("cuda")


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- the encoder


def ensure_hubert(args) -> Path:
    """The random-init HuBERT (large sizes; tiny in --cpu-smoke) saved with save_pretrained."""
    import torch
    from transformers import HubertModel

    path = Path(args.work) / "hubert"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        HubertModel(hubert_config("tiny" if args.cpu_smoke else "large")).eval().save_pretrained(path)
    return path


def part_encoder(args) -> None:
    """HuBERT-large forward throughput (audio-s/s) in bf16 / fp16 autocast and fp32, plus serray's
    HFEncoder.encode end to end (what featurize and Serve run)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import HubertModel

    from serray.data.features.encoders import build_encoder

    dev = device_of(args)
    t = time.perf_counter()
    path = ensure_hubert(args)
    model = HubertModel.from_pretrained(path).to(dev).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"# encoder: random-init HuBERT {'tiny' if args.cpu_smoke else 'large'} ({n_params / 1e6:.1f} M parameters, "
        f"hidden {model.config.hidden_size} x {model.config.num_hidden_layers} layers), built and loaded in "
        f"{time.perf_counter() - t:.1f} s on {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (serray's HFEncoder runs with the default)
    clip_s = 1.0 if args.cpu_smoke else 4.0
    sr = 16000
    rng = np.random.default_rng(0)

    # FLOPs per audio-second, counted once (fp32, B=1)
    x1 = torch.from_numpy(rng.standard_normal((1, int(clip_s * sr))).astype(np.float32)).to(dev)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x1, attention_mask=torch.ones_like(x1, dtype=torch.long))
    flops_per_audio_s = counter.get_total_flops() / clip_s
    say(f"# {flops_per_audio_s / 1e9:.2f} GFLOP per audio-second (FlopCounterMode; {clip_s:g} s clip); "
        f"{H100_ENCODER_REF:.0f} audio-s/s would be {H100_ENCODER_REF * flops_per_audio_s / 1e12:.0f} TFLOP/s")

    def run(batch: int, dtype, iters: int) -> dict:
        x = torch.from_numpy(rng.standard_normal((batch, int(clip_s * sr))).astype(np.float32)).to(dev)
        mask = torch.ones_like(x, dtype=torch.long)
        ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype is not None else None

        def fwd():
            with torch.inference_mode():
                if ctx:
                    with ctx():
                        return model(x, attention_mask=mask).last_hidden_state
                return model(x, attention_mask=mask).last_hidden_state

        for _ in range(2):
            fwd()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iters):
            fwd()
        sync(dev)
        dt = (time.perf_counter() - t0) / iters
        rate = batch * clip_s / dt
        return {"batch": batch, "dtype": str(dtype).replace("torch.", "") if dtype else "float32", "step_ms": dt * 1e3,
                "audio_s_per_s": rate, "tflops": rate * flops_per_audio_s / 1e12,
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}

    if args.cpu_smoke:
        plan = [(2, torch.bfloat16, 1), (2, torch.float16, 1), (2, None, 1)]
    else:
        plan = [(16, torch.bfloat16, 10), (64, torch.bfloat16, 6), (128, torch.bfloat16, 4),
                (64, torch.float16, 6), (32, None, 3)]
    rows = []
    say(f"{'batch':>5} {'dtype':>9} {'clip s':>6} {'step ms':>9} {'audio-s/s':>10} {'TFLOP/s':>8} {'peak GB':>8}")
    for batch, dtype, iters in plan:
        try:
            r = run(batch, dtype, iters)
        except Exception as e:  # e.g. fp16 autocast unsupported on this CPU, or out of memory
            say(f"{batch:>5} {str(dtype):>9}  failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append(r)
        pm = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        say(f"{r['batch']:>5} {r['dtype']:>9} {clip_s:>6g} {r['step_ms']:>9.1f} {num(r['audio_s_per_s']):>10} "
            f"{r['tflops']:>8.1f} {pm:>8}")

    # serray's HFEncoder.encode: fp32 as it is today, mixed lengths 1.5-4.5 s, padded batch + mask, copies to CPU
    enc = build_encoder(OmegaConf.create({"name": str(path), "layers": [], "sample_rate": sr, "num_mel_bins": 80,
                                          "local_files_only": True, "device": dev.type}))
    n = 4 if args.cpu_smoke else 32
    lens = rng.uniform(0.5 if args.cpu_smoke else 1.5, 1.0 if args.cpu_smoke else 4.5, n)
    wavs = [rng.standard_normal(int(s * sr)).astype(np.float32) * 0.1 for s in lens]
    enc.encode(wavs[:2])
    sync(dev)
    t0 = time.perf_counter()
    reps = 1 if args.cpu_smoke else 3
    for _ in range(reps):
        feats = enc.encode(wavs)
    sync(dev)
    dt = (time.perf_counter() - t0) / reps
    serray_rate = float(lens.sum()) / dt
    say(f"serray HFEncoder.encode (fp32, {n} utterances of {lens.min():.1f}-{lens.max():.1f} s, padded + mask, "
        f"features to CPU): {num(serray_rate)} audio-s/s ({len(feats)} outputs of dim {feats[0].shape[-1]})")
    best = max(rows, key=lambda r: r["audio_s_per_s"]) if rows else None
    if best:
        say(f"best: {num(best['audio_s_per_s'])} audio-s/s ({best['dtype']}, batch {best['batch']}) = "
            f"{best['audio_s_per_s'] / H100_ENCODER_REF:.2f} x the H100 reference of {H100_ENCODER_REF:.0f}")
    summary("encoder", best_audio_s_per_s=best and round(best["audio_s_per_s"], 1), best_dtype=best and best["dtype"],
            best_batch=best and best["batch"], serray_fp32_audio_s_per_s=round(serray_rate, 1),
            gflop_per_audio_s=round(flops_per_audio_s / 1e9, 1),
            rows=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])


# ---------------------------------------------------------------------------- corpus + features (shared)


def base_cfg(args, extra=()):
    """configs/iemocap.yaml (the paper's GPU setting) on the synthetic corpus and the random HuBERT;
    in --cpu-smoke the same keys at CPU sizes."""
    from serray.config import load_config

    work = Path(args.work)
    hub = ensure_hubert(args)
    data = work / "data"
    smoke = args.cpu_smoke
    over = [f"output_dir={work / 'runs'}", f"data.root={data / 'IEMOCAP_full_release'}",
            f"data.manifest={data / 'manifest.parquet'}", f"features.dir={data / 'features'}",
            "synthetic.enabled=true", f"synthetic.dialogs_per_session={2 if smoke else 4}",
            f"synthetic.utterances_per_dialog={8 if smoke else 50}", f"synthetic.min_duration={0.6 if smoke else 1.5}",
            f"synthetic.max_duration={1.2 if smoke else 4.5}", "synthetic.drop_fraction=0.45",
            f"encoder.name={hub}", "encoder.local_files_only=true", "encoder.layers=[]",
            f"encoder.device={'cpu' if smoke else 'cuda'}", "ray.progress_bars=false",
            "features.cache_max_mb=4096",  # rows held in memory: the loop is timed, not Parquet reads
            f"features.num_gpus={0 if smoke else 1}", f"features.batch_size={4 if smoke else 32}",
            f"pretrain.use_gpu={not smoke}", f"finetune.use_gpu={not smoke}",
            f"pretrain.cpus_per_worker={1 if smoke else 4}", f"finetune.cpus_per_worker={1 if smoke else 4}"]
    if smoke:
        over += ["adapter.d_model=32", "adapter.ff_dim=64", "adapter.num_heads=2", "adapter.pos_conv_groups=4",
                 "finetune.attention_dim=16", "finetune.hidden_dim=16", "pretrain.batch_size=8", "finetune.batch_size=8"]
    return load_config(REPO / "configs" / "iemocap.yaml", over + list(extra))


def start_ray(cfg, smoke: bool) -> float:
    """A local Ray like serray's init_ray, with an object store that fits /dev/shm (GPU machines'
    /dev/shm size is unknown)."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return 0.0
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_bavail * st.f_frsize
    except OSError:
        shm = 0
    store = int(min(2 if smoke else 16, max(1, 0.5 * shm / 2**30)) * 2**30)
    t = time.perf_counter()
    for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s node start-up wait
        try:
            # smoke: 4 logical CPUs on 2 cores, so a lingering actor + a Train worker + Ray Data never starve
            ray.init(num_cpus=4 if smoke else os.cpu_count(), object_store_memory=store,
                     runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=True, logging_level="WARNING")
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            if attempt == 2:
                raise
            say(f"# ray.init failed ({str(e)[:100]}); retrying")
            ray.shutdown()
            time.sleep(5)
    return time.perf_counter() - t


def ensure_features(args, cfg) -> dict:
    """Corpus (``serray.data.prepare.prepare_corpus``) and features (``featurize``) unless already there."""
    from serray.data.features.featurize import META_FILE, featurize, read_meta
    from serray.data.prepare import prepare_corpus

    if (Path(cfg.features.dir) / META_FILE).is_file():
        return {"reused": True, **{k: v for k, v in read_meta(cfg.features.dir).items() if k in ("num_rows", "dim")}}
    t = time.perf_counter()
    report = prepare_corpus(cfg, echo=lambda *_: None)
    gen = time.perf_counter() - t
    audio = float(report.kept["duration"].sum())
    t = time.perf_counter()
    s = featurize(cfg)
    dt = time.perf_counter() - t
    say(f"# corpus: {len(report.kept)} utterances, {audio / 60:.1f} min of audio, made in {gen:.1f} s; "
        f"featurize (Ray Data, encoder actor on {cfg.encoder.device}, fp32): {s['stored']} rows in {dt:.1f} s = "
        f"{num(audio / dt)} audio-s/s including actor start and model load")
    released = wait_released(15.0)
    return {"reused": False, "rows": s["stored"], "audio_s": audio, "featurize_s": dt, "featurize_audio_s_per_s": audio / dt,
            "encoder_actor_released_s": released}


def wait_released(timeout: float):
    """After ``featurize`` returns: seconds until the encoder actor's CPU/GPU are free again (a Ray Train
    worker that needs the GPU waits for them). If they are still held after ``timeout``, Ray is restarted
    so the next stage can run, and None is returned (worth reporting: serray's pipeline runs featurize and
    training in one Ray)."""
    import ray

    total, t = ray.cluster_resources(), time.perf_counter()
    while True:
        avail = ray.available_resources()
        held = {k: round(total.get(k, 0) - avail.get(k, 0), 2) for k in ("CPU", "GPU") if total.get(k)}
        if all(v <= 1e-6 for v in held.values()):
            waited = time.perf_counter() - t
            say(f"# after featurize: all CPUs/GPUs free again after {waited:.1f} s")
            return waited
        if time.perf_counter() - t > timeout:
            say(f"# after featurize: still held {held} {timeout:.0f} s after it returned (the encoder actor lingers?); "
                "restarting Ray so training can get them")
            ray.shutdown()
            return None
        time.sleep(0.5)


# ---------------------------------------------------------------------------- adapter training


def part_adapter(args) -> None:
    """Adapter pre-training frames/s through Ray Train (pretrain.backend=ray) vs the plain loop
    (run_loop + LocalRuntime) on the same rows and device; plus a synthetic-batch step bench."""
    import torch

    from bench.pretrain import gpu_step_bench, steady
    from serray.train.loop import LocalRuntime, run_loop
    from serray.train.pretrain import PretrainTask, pretrain_inputs, run_pretrain

    dev = device_of(args)
    epochs = 3 if args.cpu_smoke else 5
    cfg = base_cfg(args, ["pretrain.per_fold=false", "pretrain.backend=ray", "pretrain.steps=null",
                          f"pretrain.epochs={epochs}", "pretrain.num_workers=1"])
    init_s = start_ray(cfg, args.cpu_smoke)
    feats = ensure_features(args, cfg)
    init_s += start_ray(cfg, args.cpu_smoke)  # no-op unless ensure_features had to restart Ray
    loop_config, data = pretrain_inputs(cfg)
    rows = data.rows()
    crop = loop_config["max_frames"]
    frames = int(sum(min(int(t), crop) if crop else int(t) for t in rows.lengths()))
    m = loop_config["model"]
    say(f"# adapter: {len(rows)} rows, {frames} frames/epoch after the {crop}-frame crop, input {m['num_input_layers']} x "
        f"{m['input_dim']}, d_model {m['d_model']} x {m['num_layers']} layers, batch {cfg.pretrain.batch_size}, "
        f"{loop_config['steps_per_epoch']} steps/epoch x {epochs} epochs, bf16 autocast on {dev.type}; "
        f"ray.init {init_s:.1f} s")

    t = time.perf_counter()
    res = run_pretrain(cfg, force=True)
    ray_wall = time.perf_counter() - t
    hist_ray = json.loads((Path(cfg.pretrain.dir) / "history.json").read_text())
    ray_fps, n_steady = steady(hist_ray, frames)

    import ray

    ray.shutdown()
    threads = max(1, int(cfg.pretrain.cpus_per_worker))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # what the Ray Train worker gets (OMP_NUM_THREADS = its CPUs)
    try:
        lc = {**loop_config, "data_mode": "memory", "num_workers": 1}
        t = time.perf_counter()
        hist_plain = run_loop(PretrainTask(lc), lc, LocalRuntime({"train": rows}, device=dev))
        plain_wall = time.perf_counter() - t
    finally:
        torch.set_num_threads(prev)
    for h in hist_plain:
        h["seconds"] = frames / h["frames_per_s"] if h["frames_per_s"] else 0.0
    plain_fps, _ = steady(hist_plain, frames)
    say(f"{'epoch':>5} {'ray fr/s':>10} {'plain fr/s':>11}")
    for a, b in zip(hist_ray, hist_plain):
        say(f"{a['epoch']:>5} {a['frames_per_s']:>10.0f} {b['frames_per_s']:>11.0f}")
    ratio = ray_fps / plain_fps
    say(f"steady (epochs 1..{epochs - 1}) frames/s: Ray Train {ray_fps:.0f}, plain {plain_fps:.0f} ({threads} torch threads) "
        f"-> ratio {ratio:.3f}; wall: run_pretrain {ray_wall:.1f} s (trainer start, {epochs} epochs, checkpoints, export), "
        f"plain {plain_wall:.1f} s; final loss ray {hist_ray[-1]['loss']:.4f} plain {hist_plain[-1]['loss']:.4f}")
    step = None
    if dev.type == "cuda":
        step = gpu_step_bench(m["d_model"], 32, 250, 20)
        say(f"synthetic-batch step (bench/pretrain.py gpu_step_bench: d={step['d_model']}, batch 32 x 250 frames, no data "
            f"loading): {step['frames_per_s'] / 1e6:.3f} M frames/s, {step['tflops_counted']:.1f} TFLOP/s counted")
    summary("adapter", ray_frames_per_s=round(ray_fps), plain_frames_per_s=round(plain_fps), ratio=round(ratio, 3),
            steady_epochs=n_steady, ray_wall_s=round(ray_wall, 1), plain_wall_s=round(plain_wall, 1), features=feats,
            step_frames_per_s=step and round(step["frames_per_s"]), adapter=res.get("adapter"))


# ---------------------------------------------------------------------------- failure and resume


def part_failover(args) -> None:
    """One fold's fine-tuning on Ray Train with a worker failure injected in epoch 1: it must retry
    from the epoch-0 checkpoint (resumed_epoch 1 in the history) and finish every epoch."""
    from serray.train.finetune import fold_split, run_fold
    from serray.train.loop import steps_per_epoch

    device_of(args)
    epochs = 3
    cfg = base_cfg(args, ["finetune.backend=ray", "finetune.init=random", "finetune.mode=finetune",
                          f"finetune.epochs={epochs}", "finetune.patience=null", "finetune.max_failures=1",
                          "finetune.num_workers=1", "finetune.folds=[1]"])
    init_s = start_ray(cfg, args.cpu_smoke)
    feats = ensure_features(args, cfg)
    init_s += start_ray(cfg, args.cpu_smoke)  # no-op unless ensure_features had to restart Ray
    spe = steps_per_epoch(len(fold_split(cfg, 1)["train"]), cfg.finetune.batch_size, 1)
    fail_at = spe + max(1, spe // 2)  # a step inside epoch 1
    cfg = base_cfg(args, ["finetune.backend=ray", "finetune.init=random", "finetune.mode=finetune",
                          f"finetune.epochs={epochs}", "finetune.patience=null", "finetune.max_failures=1",
                          "finetune.num_workers=1", "finetune.folds=[1]", f"finetune.fail_at_step={fail_at}"])
    say(f"# failover: fold 1, {epochs} epochs x {spe} steps, a worker failure injected at step {fail_at} (epoch 1), "
        f"finetune.max_failures=1, backend=ray; ray.init {init_s:.1f} s")
    t = time.perf_counter()
    res = run_fold(cfg, 1)
    wall = time.perf_counter() - t
    # fold_result.json's history is the *selected* checkpoint's (it stops at the best epoch): read the
    # run's latest checkpoint for the whole history
    from serray.train.checkpoint import load_checkpoint

    states = [load_checkpoint(d)[0] for d in (Path(cfg.finetune.dir) / "ray").glob("fold1-*/checkpoint_*") if d.is_dir()]
    latest = max(states, key=lambda st: st["epoch"]) if states else {"history": res.get("history", [])}
    hist = latest["history"]
    resumed = sorted({h.get("resumed_epoch") for h in hist if "resumed_epoch" in h})
    marker = Path(cfg.finetune.dir) / "fold1" / "fault_injected.marker"
    ok = resumed == [1] and len(hist) == epochs and marker.is_file()
    for h in hist:
        say(f"  epoch {h['epoch']}: step {h['step']}, loss {h['loss']:.4f}, val_ua {h['val_ua']:.3f}, "
            f"{h['frames_per_s']:.0f} frames/s, resumed_epoch {h.get('resumed_epoch', '-')}")
    say(f"failover {'PASS' if ok else 'FAIL'}: {len(hist)} of {epochs} epochs in the latest checkpoint's history, "
        f"resumed_epoch {resumed} (want [1]), fault marker {'written' if marker.is_file() else 'missing'}; selected epoch "
        f"{res.get('best_epoch')}, test UA {res.get('ua', float('nan')):.3f}; run_fold {wall:.1f} s (two worker-group starts)")
    summary("failover", ok=ok, resumed_epochs=resumed, epochs=len(hist), wall_s=round(wall, 1), fail_at_step=fail_at,
            best_epoch=res.get("best_epoch"), features=feats)


# ---------------------------------------------------------------------------- Serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load(port: int, path: str, body: bytes, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads (keep-alive connections); rps, p50/p99 ms, failures.
    (The loop of bench/serve.py, copied: that file is being reworked.)"""
    import numpy as np

    lock, issued, latencies, failures = threading.Lock(), [0], [], []
    barrier = threading.Barrier(concurrency + 1)

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        mine = []
        barrier.wait()
        while True:
            with lock:
                if issued[0] >= requests:
                    break
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "audio/wav"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    failures.append((r.status, data[:200]))
            except (OSError, http.client.HTTPException) as e:
                failures.append((type(e).__name__, str(e)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"rps": len(latencies) / wall, "p50": float(np.percentile(lat, 50)) if len(lat) else math.nan,
            "p99": float(np.percentile(lat, 99)) if len(lat) else math.nan, "ok": len(latencies),
            "failures": failures[:3], "n_failed": len(failures)}


def part_serve(args) -> None:
    """Serve with the HuBERT encoder: batched vs unbatched requests/s over loopback HTTP."""
    import ray
    from ray import serve

    from serray.serve.app import build_app
    from serray.serve.demo import encode_audio, make_demo_checkpoint, synthetic_clip

    device_of(args)
    smoke = args.cpu_smoke
    cfg = base_cfg(args)
    ck = make_demo_checkpoint(Path(args.work) / "serve" / "checkpoint", adapter=True, seed=0, cfg=cfg)
    clip_s = 1.0 if smoke else 4.0
    body = encode_audio(synthetic_clip(clip_s, seed=0))
    port = free_port()
    init_s = start_ray(cfg, smoke)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    modes = ("batched", "unbatched")
    gpus = 0 if smoke else 0.5  # both replicas on the one GPU
    max_batch = 4 if smoke else 32
    t = time.perf_counter()
    for mode in modes:
        from serray.config import load_config

        app_cfg = load_config(REPO / "configs" / "iemocap.yaml", [
            f"output_dir={Path(args.work) / 'serve'}", f"serve.checkpoint={ck}", f"serve.batching={mode == 'batched'}",
            f"serve.max_batch_size={max_batch}", "serve.batch_wait_timeout_s=0.01", f"serve.num_gpus={gpus}",
            f"serve.num_cpus={1 if smoke else 2}", "serve.max_seconds=30"])
        serve.run(build_app(app_cfg), name=f"bench-{mode}", route_prefix=f"/{mode}", blocking=False,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
    for mode in modes:  # warm-up: imports, first forward (cuDNN/cuBLAS handles), keep-alive paths
        w = load(port, f"/{mode}/predict", body, 8, 4)
        assert not w["n_failed"], w["failures"]
    info = get_json(port, "/batched/info")
    say(f"# serve: two apps (batched max_batch_size={max_batch} / unbatched), 1 replica each with {gpus} GPU, model "
        f"frozen adapter + SAP on {info['encoder']['encoder']} (dim {info['encoder']['dim']}), {clip_s:g} s clips; "
        f"ray.init {init_s:.1f} s, apps up + warm in {time.perf_counter() - t:.1f} s")
    conc = [1, 4] if smoke else [1, 16, 64]
    n_req = 8 if smoke else 192
    results = {}
    for i, c in enumerate(conc):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            before = get_json(port, f"/{mode}/stats")
            r = load(port, f"/{mode}/predict", body, n_req, c)
            after = get_json(port, f"/{mode}/stats")
            n, b = after["predictions"] - before["predictions"], after["batches"] - before["batches"]
            r["mean_batch"] = n / b if b else math.nan
            r["infer_ms"] = 1e3 * (after["infer_s"] - before["infer_s"]) / n if n else math.nan
            results[(mode, c)] = r
    say(f"{'conc':>5} | {'batched rps':>11} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} | {'unbatched rps':>13} {'p50 ms':>8} "
        f"{'p99 ms':>8} | {'ratio':>6} | {'audio-s/s batched':>17}")
    for c in conc:
        b, u = results[("batched", c)], results[("unbatched", c)]
        say(f"{c:>5} | {b['rps']:>11.1f} {b['p50']:>8.1f} {b['p99']:>8.1f} {b['mean_batch']:>6.2f} | {u['rps']:>13.1f} "
            f"{u['p50']:>8.1f} {u['p99']:>8.1f} | {b['rps'] / u['rps']:>6.2f} | {b['rps'] * clip_s:>17.0f}")
    failed = sum(r["n_failed"] for r in results.values())
    c_ref = 16 if 16 in conc else conc[-1]
    ratio = results[("batched", c_ref)]["rps"] / results[("unbatched", c_ref)]["rps"]
    say(f"serve: batched/unbatched requests/s at concurrency {c_ref} = {ratio:.2f}; failed requests {failed}")
    serve.shutdown()
    ray.shutdown()
    summary("serve", ratio=round(ratio, 2), concurrency=c_ref, failed=failed,
            rps={f"{m}@{c}": round(r["rps"], 1) for (m, c), r in results.items()},
            mean_batch={f"{m}@{c}": round(r["mean_batch"], 2) for (m, c), r in results.items()})


PARTS = {"encoder": part_encoder, "adapter": part_adapter, "failover": part_failover, "serve": part_serve}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--work", default="/tmp/serray-gpu", help="shared work directory of the parts")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (checks the code paths only)")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:  # no weight-loading progress bars in the log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import torch

    say(f"# part {args.part}: {load_line()}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
        f"{' (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else ''}, "
        f"python {sys.version.split()[0]}{', CPU smoke' if args.cpu_smoke else ''}")
    t = time.perf_counter()
    PARTS[args.part](args)
    say(f"# part {args.part} done in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
