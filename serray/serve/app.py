"""The Ray Serve HTTP endpoint for a registered model (``serray serve``).

One deployment (:class:`SERDeployment`) holds the frozen encoder, the classifier (adapter branch +
SAP head) and the label set of a registry entry (``serve.model``, default the best; or the
checkpoint directory ``serve.checkpoint``). Routes, under ``serve.route_prefix``:

* ``POST /predict`` -- a WAV or FLAC file as the raw body (``Content-Type: audio/wav``, ``audio/x-wav``,
  ``audio/wave``, ``audio/flac``, ``audio/x-flac``, ``application/octet-stream``) or as a
  ``multipart/form-data`` upload (field ``file``). Returns
  ``{"label", "probabilities": {label: p}, "version", "duration_s", "batch_size"}``.
  Errors are ``{"error": "..."}`` with 400 (empty, undecodable, truncated, NaN/inf, too short or too
  long audio), 413 (body over ``serve.max_body_mb``), 415 (other content types).
* ``POST /segments`` -- a recording of any length as the raw body, decoded while it arrives and never
  held in memory: time-stamped segments and an aggregate (:mod:`serray.serve.segments`; its own limits
  ``serve.segments_max_body_mb`` and ``serve.segments_body_timeout_s``, settings ``segment.*``).
* ``GET /healthz`` -- ``{"status": "ok", "version"}``; ``GET /info`` -- the model card;
  ``GET /stats`` -- this replica's counters (requests, errors, batch sizes seen).

With ``serve.batching`` (default) concurrent requests are grouped by ``@serve.batch`` (up to
``serve.max_batch_size`` within ``serve.batch_wait_timeout_s``) into one encoder call and one padded
classifier forward; ``serve.batching=false`` runs each request alone (the bench's baseline). Either
way the replica runs the same code as ``serray predict`` (:meth:`Predictor.predict_waveforms`).

Entry points: :func:`build_app` (a bound application), :func:`run_server` (start Serve on
``serve.host:serve.port`` and block until Ctrl-C / SIGTERM), :func:`app_builder` (for
``serve run`` / ``serve deploy`` with ``configs/serve.yaml``).
"""


import asyncio
import json
import logging
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serray.errors import AudioError, ConfigError, DataError
from serray.serve.parsing import RequestError, audio_bytes
from serray.serve.service import NON_FINITE, json_safe
from serray.storage import redact_text

log = logging.getLogger("serray.serve")

#: Serve application name used by :func:`run_server` (and ``configs/serve.yaml``).
APP_NAME = "serray"
DEPLOYMENT_NAME = "SERModel"

api = FastAPI(title="serray", description="Speech emotion recognition: POST a WAV/FLAC file to /predict.")


@api.exception_handler(StarletteHTTPException)  # routing 404/405 too, not only raised HTTPExceptions
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": redact_text(str(exc.detail))},
                        headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)  # anything a route did not catch: still JSON, never a plain-text 500
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return _error(500, f"internal error: {type(exc).__name__}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": redact_text(message)})


def _json(content: Any) -> JSONResponse:
    """A JSON response of ``content`` with no NaN / Infinity in it (those become null)."""
    return JSONResponse(json_safe(content))


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class SERDeployment:
    """A replica: model + label set of one registry entry behind the FastAPI routes above."""

    def __init__(self, checkpoint: str, card: Dict[str, Any], settings: Dict[str, Any]):
        import torch

        from serray.serve.service import SERService

        num_cpus = float(settings.get("num_cpus") or 1.0)
        torch.set_num_threads(max(1, int(num_cpus)))
        use_gpu = float(settings.get("num_gpus") or 0.0) > 0 and torch.cuda.is_available()
        from serray import storage

        checkpoint = str(storage.local_copy(checkpoint, refresh=False))  # a URI: download once per node
        self.service = SERService(checkpoint, card, settings, device="cuda" if use_gpu else "cpu")
        self.batching = bool(settings["batching"])
        self.body_timeout_s = float(settings.get("body_timeout_s") or 10.0)
        self.predict_batch.set_max_batch_size(int(settings["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(float(settings["batch_wait_timeout_s"]))
        # One thread runs the model (batches never compete for the cores); decoding has its own threads,
        # so the event loop stays free to queue the next batch and to answer /healthz meanwhile.
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serray-model")
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serray-decode")
        # POST /segments: one long recording at a time per replica (decode + VAD + its segments' forwards)
        self._segments_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serray-segments")
        self.segment_settings = dict(settings.get("segment") or {})
        from serray.serve.segments import SegmentJobs

        # /predict keeps at least one of the replica's max_ongoing_requests slots
        ongoing = int(settings.get("max_ongoing_requests") or 32)
        self.segment_jobs = SegmentJobs(max(1, min(int(settings.get("segments_max_ongoing") or 2), ongoing - 1)))
        log.info("serving model %s (%s), labels %s, batching=%s", self.service.version, checkpoint,
                 self.service.predictor.labels, self.batching)

    def check_health(self) -> None:
        """Serve's periodic health check: raising marks the replica unhealthy (it gets replaced)."""
        if getattr(self, "service", None) is None:
            raise RuntimeError("serray replica has no usable model")
        idle = self.segment_jobs.stalled()
        if idle is not None:  # a segmentation job that neither receives nor decodes: the replica is replaced
            raise RuntimeError(f"the POST /segments job has made no progress for {idle:.0f} s")

    async def _run(self, pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # both replaced from the config in __init__
    async def predict_batch(self, wavs: List[np.ndarray]) -> List[Dict[str, Any]]:
        """Concurrent requests -> one encoder call + one padded classifier forward."""
        return await self._run(self._model_pool, self.service.infer, wavs)

    async def predict_one(self, wav: np.ndarray) -> Dict[str, Any]:
        """The unbatched path (``serve.batching=false``)."""
        return (await self._run(self._model_pool, self.service.infer, [wav]))[0]

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        svc = self.service
        svc.count_request()
        try:
            audio = await audio_bytes(request, svc.max_body_bytes, self.body_timeout_s,
                                      offload=lambda fn, *a: self._run(self._decode_pool, fn, *a))
            wav = await self._run(self._decode_pool, svc.decode, audio)
            result = await (self.predict_batch(wav) if self.batching else self.predict_one(wav))
            if NON_FINITE in result:
                log.error("non-finite model output for a %.2f s clip", len(wav) / svc.sample_rate)
                svc.count_error(500)
                return _error(500, f"internal error: {result[NON_FINITE]}")
            return JSONResponse(result)  # renders here (allow_nan=False): a failure is caught below
        except RequestError as e:
            svc.count_error(e.status)
            return _error(e.status, e.message)
        except AudioError as e:
            svc.count_error(400)
            return _error(400, str(e))
        except Exception as e:  # a bug or a broken model: say so, keep serving
            log.exception("prediction failed")
            svc.count_error(500)
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    @api.post("/segments")
    async def segments(self, request: Request) -> JSONResponse:
        """A recording of any length, streamed: time-stamped segments + an aggregate (serray.serve.segments)."""
        from serray.serve.segments import segments_answer

        svc = self.service
        svc.count_request()
        try:
            status, answer = await segments_answer(request, svc, self.segment_settings, svc.settings,
                                                   lambda fn: self._run(self._segments_pool, fn), self.segment_jobs)
        except RequestError as e:
            status, answer = e.status, e.message
        except Exception as e:  # a bug or a broken model: say so, keep serving
            log.exception("segmentation failed")
            status, answer = 500, f"internal error: {type(e).__name__}: {e}"
        if status != 200:
            svc.count_error(status)
            return _error(status, answer)
        return _json(answer)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return _json({"status": "ok", "version": self.service.version})

    @api.get("/info")
    async def info(self) -> JSONResponse:
        return _json(self.service.info())

    @api.get("/stats")
    async def stats(self) -> JSONResponse:
        return _json(self.service.stats())


# ---------------------------------------------------------------------------- building the app


def check_settings(s: Dict[str, Any]) -> None:
    """Value checks on the ``serve`` section (a :class:`ConfigError` naming every bad key)."""
    problems = []
    if not 1 <= int(s["port"]) <= 65535:
        problems.append(f"serve.port must be in 1..65535, got {s['port']}")
    if not str(s["route_prefix"]).startswith("/"):
        problems.append(f"serve.route_prefix must start with '/', got '{s['route_prefix']}'")
    if int(s["max_batch_size"]) < 1:
        problems.append("serve.max_batch_size must be >= 1")
    if float(s["batch_wait_timeout_s"]) < 0:
        problems.append("serve.batch_wait_timeout_s must be >= 0")
    if s["autoscaling"]:
        if not 0 <= int(s["min_replicas"]) <= int(s["max_replicas"]) or int(s["max_replicas"]) < 1:
            problems.append(f"serve.min_replicas ({s['min_replicas']}) and serve.max_replicas ({s['max_replicas']}) "
                            "must satisfy 0 <= min_replicas <= max_replicas, max_replicas >= 1")
    elif int(s["num_replicas"]) < 1:
        problems.append("serve.num_replicas must be >= 1")
    if float(s["num_cpus"]) < 0 or float(s["num_gpus"]) < 0:
        problems.append("serve.num_cpus and serve.num_gpus must be >= 0")
    if not float(s["max_body_mb"]) > 0:
        problems.append("serve.max_body_mb must be > 0")
    lo, hi = float(s["min_seconds"]), float(s["max_seconds"])
    if lo < 0 or not hi > lo or not math.isfinite(hi):
        problems.append(f"serve.min_seconds ({lo}) and serve.max_seconds ({hi}) must satisfy 0 <= min < max")
    if problems:
        raise ConfigError("invalid serve settings:\n  " + "\n  ".join(problems))


def deployment_options(s: Dict[str, Any]) -> Dict[str, Any]:
    """``Deployment.options`` from the ``serve`` section: replicas or autoscaling, resources per replica."""
    batch = int(s["max_batch_size"])
    opts: Dict[str, Any] = {
        "ray_actor_options": {"num_cpus": float(s["num_cpus"]), "num_gpus": float(s["num_gpus"])},
        # a replica must admit a full batch (Serve's default of 5 would cap every batch at 5); requests
        # beyond max_ongoing_requests wait in a bounded queue, and beyond that get 503 at once
        "max_ongoing_requests": max(batch, int(s.get("max_ongoing_requests", max(32, 2 * batch)))),
        "max_queued_requests": int(s.get("max_queued_requests", -1)),
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if s["autoscaling"]:
        opts["autoscaling_config"] = {"min_replicas": int(s["min_replicas"]), "max_replicas": int(s["max_replicas"]),
                                      "initial_replicas": max(1, int(s["min_replicas"])),
                                      "target_ongoing_requests": max(2, batch // 2) if s["batching"] else 2}
    else:
        opts["num_replicas"] = int(s["num_replicas"])
    return opts


def _settings(cfg) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(cfg.serve, resolve=True),
            "segment": OmegaConf.to_container(cfg.segment, resolve=True)}  # POST /segments


def build_app(cfg):
    """A bound Serve application for ``cfg`` (model: ``serve.checkpoint`` or registry ``serve.model`` / best).

    Resolves and checks the model on the caller's side, so an empty registry, an unknown id or a
    non-classifier checkpoint is a clear :class:`SerrayError` before any replica starts.
    """
    from serray import storage
    from serray.train.registry import model_source, resolve_model

    settings = _settings(cfg)
    check_settings(settings)
    checkpoint, entry = resolve_model(cfg)
    meta_file = Path(checkpoint) / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"model {entry.get('id')}: {checkpoint} is not a checkpoint directory (no meta.json)")
    kind = json.loads(meta_file.read_text()).get("kind")
    if kind != "classifier":
        raise DataError(f"{checkpoint} holds a '{kind}' checkpoint, not a classifier")
    card = json.loads(json.dumps(entry, default=str))  # plain JSON types for the replica
    # a model on object storage is fetched by each replica (on its own node); a local one is used in place
    source = model_source(entry) if storage.is_uri(entry.get("path", "")) else str(Path(checkpoint).resolve())
    return SERDeployment.options(**deployment_options(settings)).bind(source, card, settings)


def app_builder(args: Optional[Dict[str, Any]] = None):
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: serray.serve.app:app_builder``).

    ``args``: ``config`` (a YAML file, default ``configs/base.yaml``), ``overrides`` (a list of
    ``key=value``, or one space-separated string), and any other ``key: value`` taken as one more
    override, so ``serve run serray.serve.app:app_builder serve.model=ID`` works too.
    Relative paths resolve against the directory the builder runs in.
    """
    from serray.config import load_config

    args = dict(args or {})
    config = args.pop("config", None)
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    overrides = [str(o) for o in overrides] + [f"{k}={v}" for k, v in args.items()]
    return build_app(load_config(config, overrides))


# ---------------------------------------------------------------------------- running it


def endpoint_url(cfg) -> str:
    """``http://host:port/prefix`` (no trailing slash) of the running endpoint."""
    prefix = str(cfg.serve.route_prefix).rstrip("/")
    return f"http://{cfg.serve.host}:{int(cfg.serve.port)}{prefix}"


def run_server(cfg, blocking: bool = True, name: str = APP_NAME, logging_config: Optional[Dict[str, Any]] = None):
    """Start (or join) Ray, start Serve on ``serve.host:serve.port`` and deploy :func:`build_app`.

    ``blocking=False``: returns the ingress handle once the application is RUNNING (the caller stops
    it, e.g. with :func:`stop_server`). ``blocking=True``: prints the URL and blocks until Ctrl-C (or
    SIGTERM, e.g. ``ray job stop``), also during start-up, then deletes the application and shuts
    Serve down (when no other application is left on it); returns None.
    """
    from serray.ray_utils import init_ray

    app = build_app(cfg)  # model problems surface before Ray / Serve start
    url = endpoint_url(cfg)
    init_ray(cfg)
    if not blocking:
        return _start(cfg, app, name, logging_config)
    main_thread = threading.current_thread() is threading.main_thread()
    restore = _sigterm_as_interrupt() if main_thread else None  # after ray.init, which sets its own
    try:
        _start(cfg, app, name, logging_config)
        print(f"serray serve: application '{name}' running; POST audio to {url}/predict "
              f"(GET {url}/healthz, {url}/info). Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C must not cut the clean-up short
        prev_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            print("serray serve: shutting down", flush=True)
            stop_server(name)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, prev_int)
                signal.signal(signal.SIGTERM, restore)
    return None


def http_options(cfg) -> Dict[str, Any]:
    """Serve's ``http_options``: host, port and the end-to-end request timeout (408 after it)."""
    return {"host": str(cfg.serve.host), "port": int(cfg.serve.port),
            "request_timeout_s": float(cfg.serve.request_timeout_s)}


def _start(cfg, app, name: str, logging_config: Optional[Dict[str, Any]]):
    """Start Serve and deploy ``app``, bounded by ``serve.start_timeout_s``: first a node that can host
    a replica must exist (``serve.num_cpus`` / ``serve.num_gpus``), then the application must be
    RUNNING; otherwise it is deleted again and a :class:`ConfigError` / :class:`DataError` says why."""
    from serray.ray_utils import wait_for_node

    s = cfg.serve
    timeout = float(s.start_timeout_s)
    t0 = time.monotonic()
    wait_for_node({"CPU": float(s.num_cpus), "GPU": float(s.num_gpus)}, timeout,
                  "a serve replica (serve.num_cpus / serve.num_gpus)", "serve.start_timeout_s")
    serve.start(http_options=http_options(cfg))
    handle = serve._run(app, _blocking=False, name=name, route_prefix=str(s.route_prefix),
                        logging_config=logging_config)
    while True:
        app_status = serve.status().applications.get(name)
        state = str(getattr(app_status, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return handle
        if state == "DEPLOY_FAILED" or time.monotonic() - t0 > timeout:
            message = getattr(app_status, "message", "") or ""
            details = "; ".join(f"{d}: {getattr(ds, 'status', '')} {getattr(ds, 'message', '')}".strip()
                                for d, ds in (getattr(app_status, "deployments", None) or {}).items())
            stop_server(name)
            what = "failed to deploy" if state == "DEPLOY_FAILED" else f"was not running after {timeout:g} s " \
                                                                          "(serve.start_timeout_s)"
            raise DataError(redact_text(f"serve application '{name}' {what}: {message or details or state}"))
        time.sleep(0.25)


def stop_server(name: str = APP_NAME) -> None:
    """Delete the application; shut Serve down when nothing else runs on it."""
    import ray

    if not ray.is_initialized():
        return
    try:
        serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as e:  # Serve never started or already gone
        log.debug("stopping Serve: %s", e)


def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (call from the main thread); returns the previous handler."""

    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _sigterm)


__all__ = ["APP_NAME", "SERDeployment", "api", "app_builder", "build_app", "check_settings", "deployment_options",
           "endpoint_url", "http_options", "run_server", "stop_server"]
