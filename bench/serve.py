#!/usr/bin/env python
"""Serving throughput: the Serve endpoint with ``@serve.batch`` vs the unbatched path, over loopback HTTP.

    python bench/serve.py                                  # random-init HuBERT-base encoder, concurrency 1 and 16
    python bench/serve.py --encoder fbank --concurrency 1 8 16 32 --requests 96
    python bench/serve.py --gpu                            # replicas on the GPU (0.5 GPU each)

Why a HuBERT-base-sized encoder: batching pays where one forward is expensive and a wider one is
cheaper per item. With the fbank encoder the model costs ~1 ms per request and the HTTP proxy + Serve
routing dominate (batching cannot remove those); with HuBERT-base (12 x 768, random init, built here
exactly as ``bench/featurize.py --encoder random-hubert-base`` does: same compute as the real model, no
download) the encoder dominates.

Setup: a random-init classifier checkpoint on top of that encoder (``make_demo_checkpoint``; weights
do not change the compute), one synthetic mono 16 kHz 16-bit WAV clip (default 1.5 s). One local
Ray (``--num-cpus``, default 2) runs two applications side by side behind the same HTTP proxy:
``/batched`` (``serve.batching=true``) and ``/unbatched`` (``serve.batching=false``), one replica each
with ``--replica-cpus`` (default 1: torch gets that many threads). Access logs are off.

For every concurrency C, each application gets the same number of ``POST /predict`` requests from C
client threads (one keep-alive connection per thread, requests taken from a shared counter). Only
200 responses count: requests/s is successful responses / wall time and latency percentiles are over
them; any other answer is listed as a failure. The two applications alternate which goes first at
each C. Also reported, as ceilings: ``GET /healthz`` requests/s at the same concurrency (the HTTP proxy
-> Serve -> FastAPI path with no body, no decoding and no model: what batching cannot remove), and
the model alone in this process (encoder + classifier, batch of 1 vs a full batch, same threads):
the most batching can gain on this hardware.

Targets at concurrency 16: batched >= 1.1x unbatched requests/s on the 2-core CPU (>= 3x on a GPU),
p99 <= 3x p50, no failed request. The last line is
``RESULT serve ratio=<batched/unbatched requests/s at concurrency 16> target=<1.1 | 3>``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return json.loads(r.read())
    finally:
        conn.close()


def load(port: int, path: str, body, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads; rps and p50/p99 latency (ms) of the 200 responses,
    and every failure (non-200 answer or connection error)."""
    lock = threading.Lock()
    issued = [0]
    latencies: list = []
    failures: list = []
    barrier = threading.Barrier(concurrency + 1)
    headers = {"Content-Type": "audio/wav"}

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
                if body is None:
                    conn.request("GET", path)
                else:
                    conn.request("POST", path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:  # only successful responses count
                    failures.append((r.status, data[:200]))
                    continue
            except (OSError, http.client.HTTPException) as e:  # reconnect once and count it
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
    return {"rps": len(latencies) / wall, "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"), "ok": len(latencies),
            "failures": failures, "wall": wall}


RANDOM_HUBERT = "random-hubert-base"


def model_ceiling(ck: Path, body: bytes, batch: int, threads: int, reps: int) -> dict:
    """Encoder + classifier alone in this process: seconds per item at batch 1 and at ``batch``."""
    import torch

    from serray.predict import Predictor
    from serray.data.audio import load_audio

    torch.set_num_threads(max(1, threads))
    pred = Predictor.from_checkpoint(ck)
    wav = load_audio(body)
    pred.predict_waveforms([wav])  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps * batch):
        pred.predict_waveforms([wav])
    single = (time.perf_counter() - t0) / (reps * batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        pred.predict_waveforms([wav] * batch)
    batched = (time.perf_counter() - t0) / (reps * batch)
    return {"single_ms": 1e3 * single, "batched_ms": 1e3 * batched, "ratio": single / batched}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests per application and concurrency (default 48)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--clip-seconds", type=float, default=1.5)
    p.add_argument("--encoder", default=RANDOM_HUBERT,
                   help=f"{RANDOM_HUBERT} (default: built here), fbank, or a local HF model directory")
    p.add_argument("--adapter", action="store_true", help="classifier with a frozen adapter body (default: baseline)")
    p.add_argument("--max-batch", type=int, default=16, help="serve.max_batch_size")
    p.add_argument("--batch-wait", type=float, default=0.05, help="serve.batch_wait_timeout_s")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="serve.num_cpus per replica (torch threads)")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--gpu", action="store_true", help="replicas on the GPU (serve.num_gpus=0.5 each); target 3x")
    p.add_argument("--ceiling-reps", type=int, default=2, help="full batches timed for the in-process model ceiling")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray
    from ray import serve

    from serray.config import load_config
    from serray.serve.app import build_app
    from serray.serve.demo import encode_audio, make_demo_checkpoint, synthetic_clip

    tmp = Path(tempfile.mkdtemp(prefix="serray-bench-serve-"))
    encoder = args.encoder
    if encoder == RANDOM_HUBERT:
        from bench.featurize import make_random_hubert

        encoder = make_random_hubert(tmp / RANDOM_HUBERT)
    enc_overrides = [f"encoder.name={encoder}"] + (["encoder.local_files_only=true"] if encoder != "fbank" else [])
    ck = make_demo_checkpoint(tmp / "checkpoint", adapter=args.adapter, seed=0,
                              cfg=load_config(None, [f"output_dir={tmp}", *enc_overrides]))
    body = encode_audio(synthetic_clip(args.clip_seconds, seed=0))
    port = free_port()
    load_before = os.getloadavg()
    ceiling_model = model_ceiling(ck, body, args.max_batch, int(args.replica_cpus), args.ceiling_reps)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
                logging_config={"enable_access_log": False})
    modes = ("batched", "unbatched")
    for mode in modes:
        cfg = load_config(None, [f"output_dir={tmp}", f"serve.checkpoint={ck}", f"serve.batching={mode == 'batched'}",
                                 f"serve.max_batch_size={args.max_batch}", f"serve.batch_wait_timeout_s={args.batch_wait}",
                                 f"serve.num_cpus={args.replica_cpus}", f"serve.num_gpus={0.5 if args.gpu else 0}",
                                 "serve.max_seconds=30", "serve.max_ongoing_requests=64",
                                 "serve.max_queued_requests=-1", "serve.body_timeout_s=60", *enc_overrides])
        serve.run(build_app(cfg), name=f"bench-{mode}", route_prefix=f"/{mode}", blocking=False,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
    for mode in modes:  # warm-up: imports, first forward, keep-alive paths
        w = load(port, f"/{mode}/predict", body, 4, 2)
        assert not w["failures"], w["failures"][:3]

    info = get_json(port, "/batched/info")
    print(f"serray serve bench: encoder {info['encoder']['encoder']} (dim {info['encoder']['dim']}), model "
          f"{'adapter (frozen WAP-Transformer) + SAP' if args.adapter else 'no-adapter baseline + SAP'}, "
          f"clip {args.clip_seconds} s 16 kHz PCM_16 ({len(body)} bytes), {args.requests} requests per setting, "
          f"max_batch_size={args.max_batch}, batch_wait_timeout_s={args.batch_wait}, {args.replica_cpus} CPU per "
          f"replica{' + 0.5 GPU' if args.gpu else ''}, Ray num_cpus={args.num_cpus}, os.cpu_count()={os.cpu_count()}, "
          f"load average before start {load_before[0]:.1f}")
    print(f"model alone in this process ({int(args.replica_cpus)} torch thread(s)): {ceiling_model['single_ms']:.1f} ms "
          f"per request at batch 1, {ceiling_model['batched_ms']:.1f} ms at batch {args.max_batch}: batching can gain at "
          f"most {ceiling_model['ratio']:.2f}x here")
    results = {}
    for i, c in enumerate(args.concurrency):
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order:
            before = get_json(port, f"/{mode}/stats")
            r = load(port, f"/{mode}/predict", body, args.requests, c)
            after = get_json(port, f"/{mode}/stats")
            n, b = after["predictions"] - before["predictions"], after["batches"] - before["batches"]
            r["mean_batch"] = n / b if b else float("nan")
            r["infer_ms"] = 1e3 * (after["infer_s"] - before["infer_s"]) / n if n else float("nan")
            r["max_batch"] = after["max_batch_size_seen"]
            results[(mode, c)] = r
            if r["failures"]:
                print(f"  {mode} c={c}: {len(r['failures'])} failed requests, e.g. {r['failures'][:2]}")

    # the same HTTP + Serve path with no audio and no model: what batching cannot remove
    ceiling = {c: load(port, "/unbatched/healthz", None, max(args.requests, 4 * c), c) for c in args.concurrency}

    head = f"{'concurrency':>11} | {'batched rps':>11} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} {'batch':>6} {'model ms':>8} | " \
           f"{'unbatched rps':>13} {'p50 ms':>8} {'p99 ms':>8} {'model ms':>8} | {'ratio':>6} | {'healthz rps':>11}"
    print(head)
    print("-" * len(head))
    for c in args.concurrency:
        b, u = results[("batched", c)], results[("unbatched", c)]
        print(f"{c:>11} | {b['rps']:>11.2f} {b['p50']:>8.1f} {b['p99']:>8.1f} {b['p99'] / b['p50']:>7.2f} "
              f"{b['mean_batch']:>6.2f} {b['infer_ms']:>8.2f} | {u['rps']:>13.2f} {u['p50']:>8.1f} {u['p99']:>8.1f} "
              f"{u['infer_ms']:>8.2f} | {b['rps'] / u['rps']:>6.2f} | {ceiling[c]['rps']:>11.1f}")
    print("rps: successful (200) responses per second; batch: mean requests per batch; model ms: encoder + classifier "
          "time per request inside the replica; healthz rps: GET /healthz at the same concurrency (HTTP proxy + "
          "Serve routing + FastAPI, no audio, no model)")
    failed = sum(len(r["failures"]) for r in results.values())
    c16 = 16 if ("batched", 16) in results else args.concurrency[-1]
    b16, u16 = results[("batched", c16)], results[("unbatched", c16)]
    ratio = b16["rps"] / u16["rps"] if u16["rps"] else float("nan")
    target = 3.0 if args.gpu else 1.1
    tail = b16["p99"] / b16["p50"] if b16["p50"] else float("nan")
    print(f"concurrency {c16}: batched/unbatched {ratio:.2f}x (target >= {target:g}x; the model alone allows "
          f"{ceiling_model['ratio']:.2f}x), batched p99/p50 {tail:.2f} (target <= 3), failed requests {failed} "
          f"(target 0); load average after: {os.getloadavg()[0]:.1f} (other jobs share these cores)")
    serve.shutdown()
    ray.shutdown()
    sys.stdout.flush()
    print(f"RESULT serve ratio={ratio:.2f} target={target:g}", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
