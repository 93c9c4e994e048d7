"""Experiment tracking in MLflow, through Ray's own integrations.

Every run is recorded in the MLflow store ``tracking.uri`` (default: a SQLite store
``<output_dir>/mlflow.db``, its artifacts in ``<output_dir>/mlartifacts``; ``mlflow ui
--backend-store-uri sqlite:///<output_dir>/mlflow.db`` shows them), experiment
``tracking.experiment`` (default ``serray-<command>``):

* a **LOSO run** per ``serray pipeline`` / ``serray finetune`` (params: the resolved config; metrics:
  the fold means and sds; artifacts: ``metrics.json``, ``results.md``, the confusion matrix and the
  learning curves), with one child run per **fold** (every epoch's training loss and validation
  metrics, logged by the training loop through Ray's :func:`~ray.air.integrations.mlflow.setup_mlflow`
  on rank 0; the fold's test UA / WA / F1) and per **pre-training** (every epoch's losses and
  diagnostics, ``curves.png``, the exported adapter's location);
* a **sweep run** per ``serray tune``, one child run per Tune trial (Ray's
  :class:`~ray.air.integrations.mlflow.MLflowLoggerCallback`: the swept values and every result) and
  the **final** run of the chosen configuration(s);
* an **ablation run** per ``serray ablate``, one child run per arm x mode x label fraction x seed
  (tagged), the comparison tables as artifacts.

Every run carries a tag ``serray.key`` made of config hashes: a resumed or repeated run finds its
run and continues it instead of starting a new one. Tracking never breaks a run: an unreachable
store or a failing call gives one warning and the run goes on without it (its files are written as
usual). Params hold the config without storage credentials (:func:`serray.storage.strip_credentials`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from serray import storage

log = logging.getLogger(__name__)

KEY_TAG = "serray.key"
PARENT_TAG = "mlflow.parentRunId"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

#: The command whose runs this process records (``serray <command>`` sets it): the default experiment
#: is ``serray-<command>`` (``serray`` when the stages are called as a library).
COMMAND: Dict[str, Optional[str]] = {"name": None}

_TRACKERS: Dict[tuple, "Tracker"] = {}


def default_uri(output_dir: str) -> str:
    """The embedded store of a run directory: ``sqlite:///<output_dir>/mlflow.db``."""
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(str(output_dir))), DB_FILE)


def resolve_uri(value: Optional[str], output_dir: str) -> str:
    """``tracking.uri`` as MLflow takes it: null -> the embedded store under ``output_dir``; a path to a
    ``.db`` file -> a SQLite store there; any ``scheme://`` URI (``http(s)://`` server,
    ``sqlite:///``, ``postgresql://``...) as given. Raises ValueError for anything else."""
    if value is None or str(value) == "":
        return default_uri(output_dir)
    text = str(value)
    if text.startswith("sqlite:///") and not os.path.isabs(text[len("sqlite:///"):].split("?", 1)[0]):
        # MLflow's relative form (sqlite:///mlflow.db): relative to where the command runs, as a path is
        return "sqlite:///" + os.path.abspath(os.path.expanduser(text[len("sqlite:///"):]))
    if "://" in text:
        return text
    if text.endswith(".db"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(text))
    raise ValueError(f"tracking.uri={text} must be a tracking server (http://host:5000), a database URI "
                     "(sqlite:///path/mlflow.db) or a path to a .db file (null: <output_dir>/mlflow.db)")


def credentials_to_environment(uri: str) -> str:
    """A tracking server URI with ``user:password@`` -> the URI without them; the credentials go where
    MLflow reads them (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` of this process, and of
    the Ray workers it starts), never into a pickled callback, a record or a message."""
    text = str(uri)
    if not text.startswith(("http://", "https://")):
        return text
    scheme, creds, location, query = storage.split_uri(text)
    if creds is None:
        return text
    from urllib.parse import unquote

    user, _, password = creds.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return f"{scheme}://{location}{'?' + query if query else ''}"


def artifact_root(uri: str) -> Optional[str]:
    """Where the experiments of a SQLite store keep their artifacts: beside the database (a server
    decides for itself)."""
    if uri.startswith("sqlite:///"):
        return Path(os.path.dirname(uri[len("sqlite:///"):])).joinpath(ARTIFACTS_DIR).as_uri()
    return None


def short_hash(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:12]


def config_params(cfg) -> Dict[str, str]:
    """The resolved config as flat MLflow params (``adapter.mask_ratio``...), without storage
    credentials (the tracking URI's too)."""
    from omegaconf import OmegaConf

    container = storage.strip_credentials(OmegaConf.to_container(cfg, resolve=True))
    out: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = storage.redact_text(str(node))[:6000]

    walk(container, "")
    return out


def numeric(metrics: Dict[str, Any], skip: tuple = ()) -> Dict[str, float]:
    """The finite numbers of a metrics dict (booleans as 0/1), keys under ``skip`` prefixes left out."""
    out = {}
    for k, v in metrics.items():
        if any(str(k).startswith(p) for p in skip) or isinstance(v, (str, bytes)) or v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def _quick_failures() -> None:
    """MLflow's HTTP client retries 7 times with exponential backoff (minutes against a dead server):
    fail within seconds instead, so that tracking never holds a run up."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class Tracker:
    """The MLflow store and experiment of a run, with every call guarded (a failure disables it, once,
    with a warning) and a stack of the driver's open runs (new runs nest under the innermost)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True, timeout_s: float = 5.0,
                 experiment_id: Optional[str] = None):
        uri = credentials_to_environment(uri)  # a server's user:password@ never reaches a pickle or a record
        self.uri, self.experiment, self.enabled, self.timeout_s = uri, experiment, enabled, timeout_s
        self.experiment_id = experiment_id
        self._client = None
        self._stack: List[Optional[str]] = []

    def __getstate__(self):  # pickled with a Tune callback (tuner.pkl): no client, no open runs
        return {**self.__dict__, "_client": None, "_stack": []}

    # -------------------------------------------------------------- construction

    @classmethod
    def of(cls, cfg) -> "Tracker":
        """The tracker of a config in this process (one per store and experiment)."""
        t = cfg.tracking
        experiment = str(t.experiment or (f"serray-{COMMAND['name']}" if COMMAND["name"] else "serray"))
        uri = resolve_uri(t.uri, cfg.output_dir)
        key = (uri, experiment, bool(t.enabled))
        if key not in _TRACKERS:
            _TRACKERS[key] = cls(uri, experiment, enabled=bool(t.enabled), timeout_s=float(t.timeout_s))
        return _TRACKERS[key]

    @classmethod
    def from_target(cls, target: Optional[Dict[str, Any]]) -> "Tracker":
        """The tracker a Tune trial or Ray Train worker rebuilds from :meth:`target`."""
        if not target:
            return cls("", "", enabled=False)
        return cls(target["uri"], target["experiment"], timeout_s=target.get("timeout_s", 5.0),
                   experiment_id=target["experiment_id"])

    def target(self, parent: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """What another process needs to log under ``parent`` (None when tracking is off)."""
        if not self.enabled or self.client() is None:
            return None
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "parent": parent, "timeout_s": self.timeout_s}

    # -------------------------------------------------------------- guarded access

    def disable(self, what: str, error: BaseException) -> None:
        if self.enabled:
            message = storage.redact_text(str(error)).strip().splitlines()
            log.warning("tracking: %s failed (%s); the run goes on without MLflow tracking (its files are "
                        "written as usual)", what, (message[0] if message else type(error).__name__)[:300])
        self.enabled = False

    def _probe(self) -> None:
        """An HTTP store must answer within ``timeout_s`` (any HTTP answer counts)."""
        import urllib.error
        import urllib.request

        probe = urllib.request.Request(self.uri.rstrip("/") + "/health")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user is not None:  # MLflow's basic auth (a server started with --app-name basic-auth)
            import base64

            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            probe.add_header("Authorization", f"Basic {token}")
        try:
            urllib.request.urlopen(probe, timeout=self.timeout_s).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"the tracking server {storage.redact(self.uri)} is unreachable: "
                                  f"{getattr(e, 'reason', e)}") from None

    def client(self):
        """The ``MlflowClient`` (the experiment created on first use), or None when tracking is off."""
        if not self.enabled:
            return None
        if self._client is None:
            try:
                _quick_failures()
                if self.uri.startswith(("http://", "https://")):
                    self._probe()
                from mlflow import MlflowClient

                if self.uri.startswith("sqlite:///"):  # a new store's directory (MLflow says "unable to open")
                    Path(self.uri[len("sqlite:///"):].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
                client = MlflowClient(tracking_uri=self.uri)
                if self.experiment_id is None:
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        try:
                            self.experiment_id = client.create_experiment(self.experiment,
                                                                          artifact_location=artifact_root(self.uri))
                        except Exception:  # created meanwhile by another process
                            self.experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
                    else:
                        self.experiment_id = exp.experiment_id
                self._client = client
            except Exception as e:
                self.disable(f"opening the MLflow store {storage.redact(self.uri)}", e)
                return None
        return self._client

    def _call(self, what: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        client = self.client()
        if client is None:
            return default
        try:
            return fn(client)
        except Exception as e:
            self.disable(what, e)
            return default

    # -------------------------------------------------------------- runs

    def find_run(self, key: str) -> Optional[str]:
        """The run tagged ``serray.key=key`` in the experiment, or None."""
        safe = key.replace("'", "")

        def find(c):
            runs = c.search_runs([self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{safe}'", max_results=1)
            return runs[0].info.run_id if runs else None

        return self._call("searching runs", find)

    def open_run(self, key: str, name: str, parent: Optional[str] = None, tags: Optional[Dict[str, Any]] = None,
                 params: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """The run of ``key``: found (a rerun or resume continues it) or created under ``parent`` with
        ``tags`` and ``params``; None when tracking is off."""
        found = self.find_run(key)
        if found is not None:
            self._call("reopening a run", lambda c: c.update_run(found, status="RUNNING"))
            return found

        def create(c):
            t = {KEY_TAG: key.replace("'", ""), **{k: str(v) for k, v in (tags or {}).items()}}
            if parent:
                t[PARENT_TAG] = parent
            run = c.create_run(self.experiment_id, run_name=name, tags=t)
            self._log_params(c, run.info.run_id, params or {})
            return run.info.run_id

        return self._call(f"creating the run {name}", create)

    @staticmethod
    def _log_params(client, run_id: str, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=items[i:i + 100])

    def metrics_of(self, run_id: Optional[str]) -> Dict[str, float]:
        """The latest value of every metric a run holds ({} when tracking is off or the run is new)."""
        if not run_id:
            return {}
        return self._call("reading a run", lambda c: dict(c.get_run(run_id).data.metrics), {}) or {}

    def log_metrics(self, run_id: Optional[str], metrics: Dict[str, Any], step: Optional[int] = None,
                    skip: tuple = ()) -> None:
        if not run_id:
            return
        from_metrics = numeric(metrics, skip)

        def log_batch(c):
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            items = [Metric(k, v, ts, int(step or 0)) for k, v in from_metrics.items()]
            for i in range(0, len(items), 1000):
                c.log_batch(run_id, metrics=items[i:i + 1000])

        if from_metrics:
            self._call("logging metrics", log_batch)

    def set_tags(self, run_id: Optional[str], tags: Dict[str, Any]) -> None:
        if run_id and tags:
            def set_all(c):
                from mlflow.entities import RunTag

                c.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

            self._call("setting tags", set_all)

    def log_artifacts(self, run_id: Optional[str], paths: List[Any], artifact_path: Optional[str] = None) -> None:
        """Files (those that exist) as artifacts of ``run_id``."""
        files = [str(p) for p in paths if p is not None and os.path.isfile(str(p))]
        if run_id and files:
            self._call("logging artifacts", lambda c: [c.log_artifact(run_id, f, artifact_path) for f in files])

    def finish(self, run_id: Optional[str], status: str = "FINISHED") -> None:
        if run_id:
            self._call("ending a run", lambda c: c.set_terminated(run_id, status))

    @property
    def current(self) -> Optional[str]:
        """The innermost open run of this process (what new runs nest under)."""
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def run(self, key: str, name: str, tags: Optional[Dict[str, Any]] = None, params: Optional[Dict[str, Any]] = None,
            parent: Optional[str] = None) -> Iterator[Optional[str]]:
        """Open (or continue) the run of ``key`` for the block, nested under the innermost open run;
        it ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C)."""
        run_id = self.open_run(key, name, parent=parent if parent is not None else self.current, tags=tags,
                               params=params)
        self._stack.append(run_id)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._stack.pop()
            self.finish(run_id, status)

    # -------------------------------------------------------------- Ray Tune

    def tune_callback(self, parent: Optional[str], key_prefix: str, params_of: Callable[[Dict[str, Any]], Dict[str, Any]],
                      tags: Optional[Dict[str, Any]] = None):
        """Ray's ``MLflowLoggerCallback`` for a Tune experiment: one run per trial nested under
        ``parent``, its params ``params_of(trial.config)``, every result as metrics (one batch per
        result), and a resumed trial (``Tuner.restore``) continuing its run. None when tracking is off."""
        if self.target(parent) is None:
            return None
        return _trial_callback(self, parent, key_prefix, params_of, dict(tags or {}))


def _trial_callback(tracker: Tracker, parent, key_prefix, params_of, tags):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRuns(MLflowLoggerCallback):
        """``MLflowLoggerCallback`` with serray's run keys, nesting and guards."""

        serray_tracking = True

        def setup(self, *args, **kwargs):
            try:
                super().setup(*args, **kwargs)
            except Exception as e:
                tracker.disable("the Tune MLflow callback", e)
            # the base class sets these last: a failed setup must not leave the sweep's callbacks without them
            self.tags = self.tags if getattr(self, "tags", None) is not None else {}
            self._trial_runs = getattr(self, "_trial_runs", None) or {}

        def log_trial_start(self, trial):
            if not tracker.enabled or trial in self._trial_runs:
                return
            key = f"{key_prefix}/{trial.trial_id}"
            run_id = tracker.find_run(key)  # a trial resumed by Tuner.restore continues its run
            if run_id is None:
                try:
                    run = self.mlflow_util.start_run(run_name=str(trial), tags={
                        **self.tags, "trial_name": str(trial), "trial_id": trial.trial_id, KEY_TAG: key,
                        **({PARENT_TAG: parent} if parent else {})})
                    run_id = run.info.run_id
                except Exception as e:
                    tracker.disable("creating a trial's run", e)
                    return
                tracker._call("logging a trial's params", lambda c: tracker._log_params(c, run_id, params_of(trial.config)))
            else:
                tracker._call("reopening a trial's run", lambda c: c.update_run(run_id, status="RUNNING"))
            self._trial_runs[trial] = run_id

        def log_trial_result(self, iteration, trial, result):
            run_id = self._trial_runs.get(trial)
            step = result.get("training_iteration", iteration)
            tracker.log_metrics(run_id, result, step=step, skip=("config", "trial_id", "date", "hostname",
                                                                 "node_ip", "pid", "timestamp"))

        def log_trial_end(self, trial, failed: bool = False):
            run_id = self._trial_runs.get(trial)
            tracker.finish(run_id, "FAILED" if failed else "FINISHED")

    return TrialRuns(tracking_uri=tracker.uri, experiment_name=tracker.experiment, tags=tags)


# ------------------------------------------------------------------ a training loop's run


def loop_spec(target: Optional[Dict[str, Any]], key: str, name: str, tags: Optional[Dict[str, Any]] = None,
              params: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """What :class:`LoopRun` needs (a loop config entry), or None when tracking is off."""
    if not target:
        return None
    return {**target, "key": key, "name": name, "tags": dict(tags or {}), "params": dict(params or {})}


class LoopRun:
    """One training loop's MLflow run: opened (or continued, on a resume) by rank 0 through Ray's
    ``setup_mlflow``, every epoch's metrics logged at its step. A no-op without a spec, on other
    ranks, or when the store fails."""

    def __init__(self, spec: Optional[Dict[str, Any]], rank: int = 0):
        self.mlflow, self.run_id, self.tracker = None, None, Tracker.from_target(spec)
        if not spec or rank != 0:
            return
        self.run_id = self.tracker.open_run(spec["key"], spec["name"], parent=spec.get("parent"), tags=spec.get("tags"),
                                            params=spec.get("params"))
        if self.run_id is None:
            return
        self.tracker.set_tags(self.run_id, {"logged_from_node": _node_id()})
        previous = os.environ.get("MLFLOW_RUN_ID")
        try:
            from ray.air.integrations.mlflow import setup_mlflow

            os.environ["MLFLOW_RUN_ID"] = self.run_id  # mlflow.start_run continues this run
            self.mlflow = setup_mlflow(tracking_uri=spec["uri"], experiment_id=spec["experiment_id"],
                                       run_name=spec["name"], rank_zero_only=True)
        except Exception as e:
            self.tracker.disable("setup_mlflow", e)
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_RUN_ID", None)
            else:
                os.environ["MLFLOW_RUN_ID"] = previous

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self.mlflow is None:
            return
        try:
            self.mlflow.log_metrics(numeric(metrics), step=int(step))
        except Exception as e:
            self.tracker.disable("logging an epoch", e)
            self.mlflow = None

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow is None:
            return
        try:
            self.mlflow.end_run(status)
        except Exception as e:
            self.tracker.disable("ending a run", e)
        self.mlflow = None


def _node_id() -> str:
    """The Ray node this process runs on ("driver" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
    except Exception:
        return "unknown"


# ------------------------------------------------------------------ what the stages log


def stage_key(kind: str, config_hash: str, where: str, *more: Any) -> str:
    """A run's ``serray.key``: its kind, the config hash that names its outputs, a hash of where they
    are written (two run directories with one config are two runs) and anything else (a fold)."""
    return "/".join([kind, config_hash, short_hash(where), *[str(m) for m in more]])


#: A fold result's test scores (categorical: UA / WA / macro-F1; dimensional: CCC, Pearson r, MAE per dimension).
TEST_SCORES = ("ua", "wa", "macro_f1", "n_test", "ccc", "pearson", "mae")


def test_scores(result: Dict[str, Any], prefix: str = "test_") -> Dict[str, float]:
    """The test scores of a fold result (or a LOSO mean) under ``prefix``."""
    return {f"{prefix}{k}": v for k, v in numeric(result).items() if k in TEST_SCORES or k.split("_")[0] in TEST_SCORES}


def log_loso(tracker: Tracker, run_id: Optional[str], summary: Dict[str, Any], out_dir: str) -> None:
    """A LOSO run's fold means and sds, per-fold test scores (step = fold) and its files (those the
    task wrote: a dimensional run has scatter plots, no confusion matrix)."""
    if not run_id:
        return
    tracker.log_metrics(run_id, test_scores(summary.get("mean", {})))
    tracker.log_metrics(run_id, {f"{k}_std": v for k, v in test_scores(summary.get("std", {})).items()})
    for f in summary.get("folds", []):
        tracker.log_metrics(run_id, test_scores(f, "fold_test_"), step=int(f["fold"]))
    if not storage.is_uri(out_dir):
        out = Path(out_dir)
        tracker.log_artifacts(run_id, [out / n for n in ("metrics.json", "results.md", "learning_curves.png", "config.yaml")]
                              + sorted(p for p in out.glob("*.png") if p.name != "learning_curves.png"))
