#!/usr/bin/env bash
# serray on one GPU: encoder throughput, adapter training (Ray Train vs plain loop), fine-tuning with a
# forced worker failure and resume, Serve batched vs unbatched -- in one command of under 10 minutes.
#
# ---------------------------------------------------------------------------------------------- running
# Here (a machine that reaches PyPI), once:   bash bench/gpu_wheels.sh     # cp312 wheels into .whl/ (~52 MiB)
# On the GPU machine (device tool):           run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# Validate every code path without a GPU:     bash bench/gpu.sh --cpu-smoke            (~6-10 min on 2 busy cores)
# Rehearse the offline install as well:       PYTHON=/a/venv/bin/python SITE=/tmp/x bash bench/gpu.sh --cpu-smoke --wheels DIR
# Rerun some parts only (a failed one):       bash bench/gpu.sh --parts "failover serve"
# Options: --parts "encoder adapter failover serve" (default: all, in this order), --work DIR (default
# /tmp/serray-gpu), --budget S (default 570: the whole script, install included, ends by then; each part
# also has its own cap), --wheels DIR (default .whl; GPU mode installs from it, --cpu-smoke only if given).
# The full log is written to $OUT/gpu.log (or /tmp/serray-gpu-out/gpu.log) and the SUMMARY lines to
# summary.jsonl beside it; the device tool's output_tail shows the end of the same output.
#
# The GPU machine (nvidia-h200 kind): Python 3.12 with torch 2.11+cu130, torchaudio, transformers, pandas,
# pyarrow, scikit-learn, matplotlib, aiohttp, grpcio, uvloop, httpx -- no ray, omegaconf, soundfile,
# pydantic, fastapi, uvicorn, jsonschema, opencensus/opentelemetry. Those come from .whl/ (made by
# bench/gpu_wheels.sh; ray's wheel minus its 31 MiB Java jar, since the whole call may carry 64 MiB).
# Installed with pip --no-index --no-deps --target /tmp/site (nothing is fetched; nothing of the image changes).
#
# ------------------------------------------------------------------------------------- what it prints
# [install]  pip's errors only, then one line: python, torch, cuda device, ray/omegaconf/pydantic versions.
#            An ImportError here means a wheel is missing from bench/gpu_wheels.sh's list.
#
# [encoder]  (bench/gpu_bench.py encoder, cap 100 s) A random-init HuBERT-large (transformers.HubertConfig
#            with hubert-large-ll60k's sizes, layer-norm feature extractor; 316 M parameters), 4 s clips:
#            - "N GFLOP per audio-second" (FlopCounterMode; ~35) and what 5,700 audio-s/s means in TFLOP/s;
#            - a table: batch, dtype (bfloat16 / float16 autocast, float32), step ms, audio-s/s, TFLOP/s,
#              peak GPU memory. Reading: the limit to approach is ~5,700 audio-s/s (one H100, bf16); an
#              H200 has the H100's compute, so expect the same order (~0.8-1.2x). TFLOP/s against ~990
#              (dense bf16 peak) is the utilisation; far below (< 2,000 audio-s/s in bf16) means small
#              batches or an attention path without flash/SDPA kernels. float32 runs ~5-10x slower.
#            - "serray HFEncoder.encode (fp32 ...)": what `serray featurize` and Serve run today (fp32, mixed
#              lengths padded with a mask, features copied to CPU). Its gap to the bf16 row is what adding
#              autocast to serray.data.features.encoders.HFEncoder would buy.
#            - "best: X audio-s/s = r x the H100 reference".
#
# [adapter]  (bench/gpu_bench.py adapter, cap 180 s) configs/iemocap.yaml's adapter (1024-dim input, d_model
#            512 x 3 layers, batch 32, 250-frame crops, bf16) pre-trained on a 1,000-utterance synthetic corpus
#            (1.5-4.5 s, ~55 min of audio) featurized with the random HuBERT-large (last layer) by
#            `featurize` on the GPU (printed: audio-s/s incl. actor start, fp32). Then 5 epochs twice on the
#            same rows held in memory: `run_pretrain` with pretrain.backend=ray (a Ray Train worker with 1 GPU,
#            4 CPUs) and `serray.train.loop.run_loop` with `LocalRuntime(device="cuda")` (the plain loop, 4
#            torch threads like the worker). Prints per-epoch in-loop frames/s of both, the steady ratio
#            (epochs 1-4, Ray Train / plain; >= 0.8 is the CPU bench's target: Ray Train should cost little),
#            wall times, final losses (equal arithmetic -> close losses), and bench/pretrain.py's
#            synthetic-batch step (no data loading): if the loops run far below the step bench, they are
#            bound by the CPU-side collate (decoding float16 rows, padding), not by the GPU.
#
# [failover] (bench/gpu_bench.py failover, cap 120 s) `run_fold(cfg, 1)` with finetune.backend=ray,
#            finetune.use_gpu=true, init=random (no pre-training needed), 3 epochs, finetune.fail_at_step set
#            inside epoch 1, finetune.max_failures=1. Prints each epoch (step, loss, val UA, frames/s,
#            resumed_epoch) of the run's latest checkpoint and "failover PASS" when that history says
#            resumed_epoch 1 (the new worker group restored the epoch-0 checkpoint), all 3 epochs ran and the
#            fault marker was written; else FAIL. (fold_result.json's own history stops at the selected epoch.)
#
# [serve]    (bench/gpu_bench.py serve, cap 140 s) Two Serve apps on one local Ray, batched (@serve.batch,
#            max_batch_size 32) and unbatched, one replica each with 0.5 GPU, serving a random-init classifier
#            with a frozen adapter on the random HuBERT-large (serray.serve.demo.make_demo_checkpoint), 4 s WAV
#            clips over loopback HTTP at concurrency 1, 16, 64 (192 requests each). Table: requests/s, p50/p99
#            latency, mean batch, ratio, audio-s/s served. Reading: at concurrency >= 16 the batched app
#            should serve several times the unbatched requests/s (one padded forward for up to 32 clips);
#            served audio-s/s vs the encoder part's fp32 row shows how much HTTP/decoding/queueing costs.
#
# SUMMARY <part> {json}: one per part, repeated at the end and in summary.jsonl; a part that failed or ran
# out of time says so ("FAILED rc=..."), and the next part still runs.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
SMOKE=0
PARTS="encoder adapter failover serve"
WORK=/tmp/serray-gpu
BUDGET=570
WHEELS=.whl
WHEELS_GIVEN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1; shift ;;
    --parts) PARTS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; WHEELS_GIVEN=1; shift 2 ;;
    *) echo "usage: $0 [--cpu-smoke] [--parts \"encoder adapter failover serve\"] [--work DIR] [--budget S] [--wheels DIR]" >&2
       exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}   # where the wheels are installed (a rehearsal here can point it elsewhere)
LOGDIR=${OUT:-/tmp/serray-gpu-out}
mkdir -p "$LOGDIR" "$WORK"
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0 RAY_DEDUP_LOGS=1 \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
unset RAY_ADDRESS
START=$(date +%s)

cap_of() {  # seconds a part may take
  if [ "$SMOKE" = 1 ]; then echo 900; return; fi   # a loaded 2-core box can take minutes per part
  case "$1" in encoder) echo 100 ;; adapter) echo 180 ;; failover) echo 120 ;; serve) echo 140 ;; *) echo 120 ;; esac
}

main() {
  echo "== serray gpu bench: $(date -u +%FT%TZ), $(nproc) cores, mode $([ "$SMOKE" = 1 ] && echo cpu-smoke || echo gpu), parts: $PARTS"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "$SMOKE" = 0 ] || [ "$WHEELS_GIVEN" = 1 ]; then
    echo "== [install] $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS -> $SITE"
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run bench/gpu_wheels.sh here and carry .whl"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { echo "pip install failed"; return 1; }
    export PYTHONPATH="$SITE:$REPO"
    echo "installed in $(( $(date +%s) - START )) s"
  else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" - <<'EOF' || { echo "import check failed: a wheel is missing (see bench/gpu_wheels.sh)"; return 1; }
import sys, torch, ray, omegaconf, pydantic, soundfile, transformers
import ray.data, ray.train, ray.tune, ray.serve, ray.train.torch  # noqa: F401
import serray.data.features.featurize, serray.train.finetune, serray.serve.app  # noqa: F401
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.cuda.is_available()}"
      f"{', ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}), ray {ray.__version__} "
      f"({ray.__file__.rsplit('/ray/', 1)[0]}), omegaconf {omegaconf.__version__}, pydantic {pydantic.VERSION}, "
      f"transformers {transformers.__version__}")
EOF
  local part cap left rc t0
  for part in $PARTS; do
    left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    cap=$(cap_of "$part")
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 30 ]; then
      echo "== [$part] skipped: ${left}s of the ${BUDGET}s budget left"
      echo "SUMMARY $part {\"skipped\": \"no time left\"}"
      continue
    fi
    echo "== [$part] (at most ${cap}s)"
    t0=$(date +%s)
    # SIGTERM first (Ray's handler exits the driver and its Ray goes down with it); SIGKILL 15 s later
    timeout -s TERM -k 15 "$cap" "$PY" bench/gpu_bench.py "$part" --work "$WORK" $([ "$SMOKE" = 1 ] && echo --cpu-smoke)
    rc=$?
    if [ "$rc" != 0 ]; then
      echo "SUMMARY $part {\"FAILED\": \"rc=$rc$([ "$rc" = 124 ] && echo ', timed out')\", \"seconds\": $(( $(date +%s) - t0 ))}"
    fi
  done
  echo "== done in $(( $(date +%s) - START )) s"
}

main 2>&1 | tee "$LOGDIR/gpu.log"
status=${PIPESTATUS[0]}
grep '^SUMMARY ' "$LOGDIR/gpu.log" > "$LOGDIR/summary.jsonl" || true
echo "== summaries (also in $LOGDIR/summary.jsonl):"
cat "$LOGDIR/summary.jsonl"
exit "$status"
