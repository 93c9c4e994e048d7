#!/usr/bin/env python
"""Serving throughput: the Serve endpoint with ``@serve.batch`` vs the unbatched path, over loopback HTTP.

    python bench/serve.py                      # 96 requests per setting, concurrency 1 8 16 32, baseline model
    python bench/serve.py --adapter            # the classifier with a frozen WAP-Transformer adapter (default sizes)
    python bench/serve.py --requests 128 --clip-seconds 2.0 --batch-wait 0.02

Setup: a random-init classifier checkpoint made here (``serray.serve.demo.make_demo_checkpoint``;
no training: weights do not change the compute), fbank encoder, one synthetic mono 16 kHz 16-bit
WAV clip (default 1.5 s). One local Ray (``--num-cpus``, default 2) runs two applications side by
side behind the same HTTP proxy: ``/batched`` (``serve.batching=true``) and ``/unbatched``
(``serve.batching=false``), one replica each with ``serve.num_cpus`` (default 0.5). Access logs are off
for both.

For every concurrency C, each application gets the same number of ``POST /predict`` requests from C
client threads (one keep-alive ``http.client`` connection per thread, requests taken from a shared
counter); requests/s is requests / wall time, latency is per request (send -> response read).
The two applications alternate which goes first at each C. Every response must be 200.
Also reported: the replica's encoder + classifier time per request (from ``GET /stats``) and, as
the ceiling that batching cannot raise, ``GET /healthz`` requests/s at the same concurrency (the
same HTTP proxy -> Serve -> FastAPI path with no body, no decoding and no model).

The last line is ``RESULT serve ratio=<batched/unbatched requests/s at concurrency 16> target=3``.
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
    """``requests`` POSTs from ``concurrency`` threads; rps, p50/p99 latency (ms), non-200 count."""
    lock = threading.Lock()
    issued = [0]
    latencies: list = []
    failures: list = []
    barrier = threading.Barrier(concurrency + 1)
    headers = {"Content-Type": "audio/wav"}

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
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
                if r.status != 200:
                    failures.append((r.status, data[:200]))
            except (OSError, http.client.HTTPException) as e:  # reconnect once and count it
                failures.append((type(e).__name__, str(e)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=96, help="requests per application and concurrency (default 96)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--clip-seconds", type=float, default=1.5)
    p.add_argument("--adapter", action="store_true", help="classifier with a frozen adapter body (default: baseline)")
    p.add_argument("--max-batch", type=int, default=16, help="serve.max_batch_size")
    p.add_argument("--batch-wait", type=float, default=0.01, help="serve.batch_wait_timeout_s")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="serve.num_cpus per replica")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray
    from ray import serve

    from serray.config import load_config
    from serray.serve.app import build_app
    from serray.serve.demo import encode_audio, make_demo_checkpoint, synthetic_clip

    tmp = Path(tempfile.mkdtemp(prefix="serray-bench-serve-"))
    ck = make_demo_checkpoint(tmp / "checkpoint", adapter=args.adapter, seed=0)
    body = encode_audio(synthetic_clip(args.clip_seconds, seed=0))
    port = free_port()
    load_before = os.getloadavg()

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    modes = ("batched", "unbatched")
    for mode in modes:
        cfg = load_config(None, [f"output_dir={tmp}", f"serve.checkpoint={ck}", f"serve.batching={mode == 'batched'}",
                                 f"serve.max_batch_size={args.max_batch}", f"serve.batch_wait_timeout_s={args.batch_wait}",
                                 f"serve.num_cpus={args.replica_cpus}", "serve.max_seconds=30"])
        serve.run(build_app(cfg), name=f"bench-{mode}", route_prefix=f"/{mode}", blocking=False,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
    for mode in modes:  # warm-up: imports, first forward, keep-alive paths
        w = load(port, f"/{mode}/predict", body, 16, 4)
        assert not w["failures"], w["failures"][:3]

    info = get_json(port, "/batched/info")
    print(f"serray serve bench: model {'adapter (frozen WAP-Transformer) + SAP' if args.adapter else 'no-adapter baseline + SAP'}, "
          f"encoder {info['encoder']['encoder']}, clip {args.clip_seconds} s 16 kHz PCM_16 ({len(body)} bytes), "
          f"{args.requests} requests per setting, max_batch_size={args.max_batch}, batch_wait_timeout_s={args.batch_wait}, "
          f"{args.replica_cpus} CPU per replica, Ray num_cpus={args.num_cpus}, os.cpu_count()={os.cpu_count()}, "
          f"load average before start {load_before[0]:.1f}")
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
    ceiling = {c: load(port, "/unbatched/healthz", None, args.requests, c) for c in args.concurrency}

    head = f"{'concurrency':>11} | {'batched rps':>11} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'model ms':>8} | " \
           f"{'unbatched rps':>13} {'p50 ms':>8} {'p99 ms':>8} {'model ms':>8} | {'ratio':>6} | {'healthz rps':>11}"
    print(head)
    print("-" * len(head))
    for c in args.concurrency:
        b, u = results[("batched", c)], results[("unbatched", c)]
        print(f"{c:>11} | {b['rps']:>11.1f} {b['p50']:>8.1f} {b['p99']:>8.1f} {b['mean_batch']:>6.2f} {b['infer_ms']:>8.2f} | "
              f"{u['rps']:>13.1f} {u['p50']:>8.1f} {u['p99']:>8.1f} {u['infer_ms']:>8.2f} | {b['rps'] / u['rps']:>6.2f} | "
              f"{ceiling[c]['rps']:>11.1f}")
    print("batch: mean requests per batch; model ms: encoder + classifier time per request inside the replica; "
          "healthz rps: GET /healthz at the same concurrency (HTTP proxy + Serve routing + FastAPI, no audio, no model)")
    failed = sum(len(r["failures"]) for r in results.values())
    print(f"failed requests: {failed}; load average after: {os.getloadavg()[0]:.1f}")
    c16 = 16 if ("batched", 16) in results else args.concurrency[-1]
    ratio = results[("batched", c16)]["rps"] / results[("unbatched", c16)]["rps"]
    serve.shutdown()
    ray.shutdown()
    sys.stdout.flush()
    print(f"RESULT serve ratio={ratio:.2f} target=3", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
