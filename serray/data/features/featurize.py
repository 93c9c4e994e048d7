"""Featurization with Ray Data: manifest -> audio -> frozen encoder -> Parquet partitioned by session.

Pipeline (one Ray Data job): the pending manifest rows, sorted by duration and cut into blocks so
each encoder batch holds utterances of similar length -> ``map_batches`` with :class:`EncodeBatch`
(a callable class: the encoder is loaded once per actor; CPU or GPU actors) -> ``write_parquet``
partitioned by ``session``.

Each stored row has the manifest columns plus ``num_frames`` (T), ``dim`` (D), ``num_layers`` (L)
and ``feat``: the float16 features as raw bytes of shape [T, D] (or [L, T, D]); binary + shape
columns read back about twice as fast as nested lists (see ``shared/ray-notes.md``).

The extra unlabelled audio of ``pretrain.extra_audio`` (:mod:`serray.data.corpora.extra_audio`) is featurized
with the same encoder into the partition ``session=0``; rows of sources no longer listed are removed
from it, so adding or removing a source later only computes (or drops) the rows that changed.

Resumable and idempotent: utterances already stored are not recomputed, so an interrupted run or a
deleted partition is completed by running the same command again, without duplicate rows. Files
left half-written by an interruption are detected and removed first. Audio that cannot be used is
skipped, logged and counted (``_skipped.csv``), never a crash.

``_serray_features.json`` beside the Parquet records the encoder identity (name, layers, dim,
frame rate), the config hash, the row count, rows per session (``"0"``: the extra audio) and of
them the 4-class rows (``labelled_rows_per_session``), the extra-audio sources, and per-session
frame statistics (count, sum and sum of squares per feature dimension). Training standardises its
input with the statistics of exactly the sessions it trains on (:func:`feature_stats`), so no test
session leaks into a fold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from serray import storage
from serray.config import as_dict, section_hash, to_yaml
from serray.data.audio import load_audio
from serray.data.features.encoders import build_encoder, check_identity, describe_encoder
from serray.data.corpora.extra_audio import EXTRA_SESSION, extra_audio_manifest
from serray.data.corpora import classes_of
from serray.data.corpora.base import LABELS, MANIFEST_COLUMNS, read_manifest
from serray.data.features.stored import decode_feature, partial_sums, reduce_partials, session_of  # noqa: F401 (decode_feature re-exported)
from serray.errors import AudioError, DataError

log = logging.getLogger(__name__)

META_FILE = "_serray_features.json"
#: The encoder identity and config hash, written before the first partition: an interrupted run leaves
#: it behind, so a later run with another encoder is refused instead of mixing two encoders' rows.
IDENTITY_FILE = "_serray_identity.json"
#: Config keys whose change changes the stored rows (a mismatch needs another features.dir or --overwrite).
FEATURE_HASH_KEYS = ("encoder", "data.merge_excited", "pretrain.use_unlabelled")
SKIPPED_FILE = "_skipped.csv"
CONFIG_FILE = "_config.yaml"  # the run config beside the features
FEATURE_COLUMNS = ["num_frames", "dim", "num_layers", "feat"]


class EncodeBatch:
    """Ray Data callable class: a batch of manifest rows -> the same rows with their features.

    Rows whose audio cannot be used are dropped here (and logged); the driver reconciles the
    counts afterwards.
    """

    def __init__(self, encoder_cfg: dict, min_seconds: float, max_seconds: Optional[float] = None,
                 fault_utt: Optional[str] = None, tracker=None):
        self.encoder = build_encoder(OmegaConf.create(encoder_cfg))
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.fault_utt = fault_utt  # fault injection (tests): this utterance kills the actor
        self.tracker = tracker  # a _BatchTracker: which batches started and never finished (their actor died)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = [str(u) for u in batch["utt_id"]]
        if self.tracker is not None:
            import ray

            ray.get(self.tracker.started.remote(ids))  # delivered before the work that may kill this process
        out = self._encode(batch)
        if self.tracker is not None:
            ray.get(self.tracker.finished.remote(ids))
        return out

    def _encode(self, batch: pd.DataFrame) -> pd.DataFrame:
        keep, wavs = [], []
        for i, path in enumerate(batch["path"]):
            if self.fault_utt is not None and batch["utt_id"].iloc[i] == self.fault_utt:
                log.error("fault injection: encoder actor exits on %s", self.fault_utt)
                os._exit(1)
            try:
                wav = load_audio(path, self.encoder.sample_rate, self.min_seconds, self.max_seconds)
            except AudioError as e:
                log.warning("skipping %s: %s", batch["utt_id"].iloc[i], e)
                continue
            if self.encoder.num_frames(len(wav)) < 1:
                log.warning("skipping %s: shorter than one encoder frame", batch["utt_id"].iloc[i])
                continue
            keep.append(i)
            wavs.append(wav)
        out = batch.iloc[keep].reset_index(drop=True)
        feats = self.encoder.encode(wavs) if wavs else []
        out["num_frames"] = np.array([f.shape[-2] for f in feats], dtype=np.int64)
        out["dim"] = np.full(len(feats), self.encoder.dim, dtype=np.int64)
        out["num_layers"] = np.full(len(feats), self.encoder.num_layers, dtype=np.int64)
        out["feat"] = [np.ascontiguousarray(f, dtype=np.float16).tobytes() for f in feats]
        return out


def read_meta(features_dir: str | Path) -> dict:
    """The metadata of a feature directory (local or a storage URI); a clear error when there is none."""
    meta = storage.join(features_dir, META_FILE)
    if not storage.is_file(meta):
        what = "does not exist" if not storage.exists(features_dir) else f"holds no {META_FILE}"
        raise DataError(f"no features in {storage.describe(features_dir)}: the directory {what} "
                        "(run `serray featurize` first)")
    return json.loads(storage.read_text(meta))


def feature_identity(meta: dict) -> dict:
    """The encoder identity part of feature metadata (what checkpoints record and check)."""
    return {k: meta[k] for k in ("encoder", "layers", "dim", "num_layers", "frame_rate", "sample_rate")}


def parquet_files(features_dir: str | Path, session: Optional[int] = None) -> List[str]:
    """The feature Parquet files under ``features_dir`` (all partitions, or one session), sorted; local
    paths or URIs, like ``features_dir``."""
    parts = [(f, session_of(f)) for f in storage.find_files(features_dir, ".parquet")]
    return [f for f, s in parts if s is not None and (session is None or s == session)]


def _is_broken(path: str, attempts: int = 2) -> bool:
    """True when a Parquet file is *definitely* half-written: pyarrow finds no valid footer, twice.

    An I/O error (a storage hiccup, a permission problem, a network timeout) says nothing about the
    file: it is raised as a DataError and the file is kept.
    """
    import pyarrow as pa

    for attempt in range(attempts):
        try:
            storage.parquet_file(path).metadata
            return False
        except pa.ArrowInvalid:  # no footer / not Parquet: what an interrupted write leaves
            if attempt + 1 < attempts:
                time.sleep(0.5)
        except OSError as e:
            raise DataError(f"cannot read the feature file {storage.describe(path)} ({storage.redact_text(str(e))}); "
                            "it was left in place: run again when the storage is reachable") from None
    return True


def _remove_broken_files(features_dir: str, before_change=None) -> int:
    """Delete Parquet files an interrupted write left unreadable; return how many. A file that only
    fails to be read (an I/O error) is never deleted (see :func:`_is_broken`)."""
    broken = 0
    for f in parquet_files(features_dir):
        if _is_broken(f):
            if before_change is not None:
                before_change()
            log.warning("removing half-written feature file %s", storage.describe(f))
            storage.remove(f)
            broken += 1
    return broken


def stored_utterances(features_dir: str | Path, columns: Sequence[str] = ("utt_id",)) -> pd.DataFrame:
    """``columns`` (default utt_id) and session of every stored row (small columns, not the features)."""
    frames = []
    for f in parquet_files(features_dir):
        t = storage.parquet_file(f).read(columns=list(columns)).to_pandas()
        t["session"] = session_of(f)
        frames.append(t)
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame({**{c: [] for c in columns}, "session": []}))


def _prune_session(features_dir: str, session: int, keep: set, before_change=None) -> int:
    """Remove the stored rows of one session whose utt_id is not in ``keep``; return how many.

    A file is rewritten under a temporary name (not ``*.parquet``, so readers ignore it), the old one
    removed, then the new one moved into place: an interruption can lose rows (the next run computes
    them again) but never duplicate them.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    for tmp in storage.find_files(features_dir, ".pruning"):  # left by an interrupted prune
        fs, p = storage.resolve(tmp)
        final = p[: -len(".pruning")] + ".parquet"
        if fs.get_file_info(final).type == pafs.FileType.NotFound:
            fs.move(p, final)  # the old file was already deleted: the pruned one is complete
        else:
            fs.delete_file(p)
    removed = 0
    for f in parquet_files(features_dir, session):
        ids = storage.parquet_file(f).read(columns=["utt_id"]).column("utt_id").to_pylist()
        stale = sum(1 for u in ids if u not in keep)
        if not stale:
            continue
        if before_change is not None:
            before_change()
        removed += stale
        fs, p = storage.resolve(f)
        if stale < len(ids):
            table = storage.parquet_file(f).read()
            table = table.filter(pc.is_in(table["utt_id"], value_set=pa.array(sorted(keep), pa.string())))
            tmp = p[: -len(".parquet")] + ".pruning"
            pq.write_table(table, tmp, filesystem=fs)
            fs.delete_file(p)
            fs.move(tmp, p)
        else:
            fs.delete_file(p)
    if removed:
        log.info("removed %d stored rows of session %d that are no longer wanted", removed, session)
    return removed


def _prune_moved(features_dir: str, wanted: pd.DataFrame, before_change=None) -> int:
    """Remove the stored rows of wanted utterances that sit in another fold group's partition than the
    manifest now gives them (a changed ``data.protocol``), so they are encoded again into their own:
    training reads a fold group's partition, and a row left in the old one would train or test in the
    wrong fold. Rows the manifest does not want are left alone."""
    stored = stored_utterances(features_dir)
    if stored.empty:
        return 0
    group = stored["utt_id"].map(dict(zip(wanted["utt_id"], wanted["session"].astype(int))))
    moved = stored[group.notna() & (group != stored["session"])]
    removed = 0
    for session, rows in moved.groupby("session"):
        keep = set(stored.loc[stored["session"] == session, "utt_id"]) - set(rows["utt_id"])
        removed += _prune_session(features_dir, int(session), keep, before_change)
    if removed:
        log.info("%d stored rows belong to another fold group now; they are encoded again", removed)
    return removed


def _bucketed_blocks(df: pd.DataFrame, batch_size: int, min_blocks: int) -> List[pd.DataFrame]:
    """Sort rows by duration and cut them into blocks of whole batches (length bucketing), longest
    block first.

    Blocks hold equal row counts, so their cost grows with their durations. Handed out shortest first,
    the first actor of a pool queues the cheap blocks and an actor that joins later gets the dear ones:
    on 2 cores with two HuBERT-base actors the pool then ran at 4.9 audio-s/s instead of 5.5 (888 s of
    audio; docs/results/featurize.txt). Longest first is the classic longest-processing-time order: the
    small blocks at the end fill the gaps.
    """
    df = df.sort_values(["duration", "utt_id"], ignore_index=True)
    batches = max(1, math.ceil(len(df) / batch_size))
    per_block = max(1, math.ceil(batches / max(1, min_blocks))) * batch_size
    return [df.iloc[i : i + per_block] for i in range(0, len(df), per_block)][::-1]


def _skip_reason(path: str, sample_rate: int, min_seconds: float, max_seconds: Optional[float] = None) -> Optional[str]:
    """Why the audio of a row cannot be used (None: it decodes fine; the encoder dropped or failed on it)."""
    try:
        load_audio(path, sample_rate, min_seconds, max_seconds)
    except AudioError as e:
        return str(e)
    return None


def _utt_digest(utt_ids) -> str:
    """A short hash of a set of utterance ids (tells whether a session's stored rows changed)."""
    return hashlib.sha256("\n".join(sorted(utt_ids)).encode()).hexdigest()[:16]


def _session_stats(features_dir: str, sessions: Sequence[int]) -> Dict[str, dict]:
    """Frame count, per-dimension sum and sum of squares ([L, D], float64) of each stored session:
    a Ray Data map over the stored rows (on the workers), then a sum of the per-batch partials."""
    import ray

    files = [f for s in sessions for f in parquet_files(features_dir, int(s))]
    if not files:
        return {}
    paths, fs = storage.ray_paths(files)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=FEATURE_COLUMNS, include_paths=True, partitioning=None)
    # batch_size=None: whole blocks, so the map fuses into the read tasks (a batch size would keep them
    # apart) and only the small partial sums pass through the object store, not every stored row
    return reduce_partials(ds.map_batches(partial_sums, batch_format="numpy", batch_size=None).iter_rows())


def session_stats_local(features_dir: str, sessions: Sequence[int]) -> Dict[str, dict]:
    """The same statistics as :func:`_session_stats`, in this process (no Ray)."""
    def partials():
        for s in sessions:
            for f in parquet_files(features_dir, int(s)):
                for batch in storage.parquet_file(f).iter_batches(batch_size=64, columns=FEATURE_COLUMNS):
                    cols = {k: np.asarray(v, dtype=object) for k, v in batch.to_pydict().items()}
                    cols["path"] = np.asarray([f] * batch.num_rows, dtype=object)
                    p = partial_sums(cols)
                    yield from ({k: p[k][i] for k in p} for i in range(len(p["session"])))
    return reduce_partials(partials())


def feature_stats(meta: dict, sessions) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ([L, D] float32) of the stored frames of ``sessions``.

    Session 0 is the extra audio; it is ignored when the metadata says none is stored (no extra
    audio configured, or every file of it skipped).
    """
    stats = meta.get("stats") or {}
    no_extra = "extra_audio" in meta and str(EXTRA_SESSION) not in (meta.get("rows_per_session") or {})
    sessions = [s for s in sessions if not (int(s) == EXTRA_SESSION and no_extra and str(s) not in stats)]
    missing = [s for s in sessions if str(s) not in stats]
    if missing:
        raise DataError(f"the feature metadata has no statistics for sessions {missing}; run `serray featurize` again")
    if not sessions:
        raise DataError("no stored features for feature statistics: the selected sessions are empty")
    # per dimension, the frames with a value (NaN: none; statistics written before that count was kept: all frames)
    n = sum(np.asarray(stats[str(s)].get("count", stats[str(s)]["frames"]), dtype=np.float64) for s in sessions)
    s1 = sum(np.asarray(stats[str(s)]["sum"]) for s in sessions)
    s2 = sum(np.asarray(stats[str(s)]["sumsq"]) for s in sessions)
    mean = s1 / np.maximum(n, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean**2, 0.0)) + 1e-5
    return mean.astype(np.float32), std.astype(np.float32)


def _write_meta(features_dir: str, meta: dict) -> None:
    storage.write_text(storage.join(features_dir, META_FILE), json.dumps(meta, indent=2))


def actor_pool_bounds(fcfg, cluster_resources: Dict[str, float]) -> tuple[int, int]:
    """(min, max) encoder actors: ``features.concurrency`` up to ``features.max_concurrency``. When that
    is null the pool may grow to what the cluster holds: one actor per ``features.num_gpus`` share of its
    GPUs (GPU actors), else one per ``features.num_cpus`` share of its CPUs (CPU actors, so that every
    core encodes; see :func:`write_remote_args` for the writes beside them)."""
    lo = int(fcfg.concurrency)
    hi = fcfg.max_concurrency
    if hi is None:
        resource, share = ("GPU", fcfg.num_gpus) if fcfg.num_gpus > 0 else ("CPU", fcfg.num_cpus)
        hi = int(float(cluster_resources.get(resource, 0.0)) // share)
    return lo, max(lo, int(hi))


def write_remote_args(fcfg, pool: tuple[int, int], num_blocks: int) -> dict:
    """Resources and concurrency of the Parquet write tasks behind the encoder actors.

    CPU actors may hold every CPU (:func:`actor_pool_bounds`); a write task that asks for one would
    then wait until encoding ends, with every encoded block held in the object store meanwhile. So
    beside CPU actors the writes (Parquet encoding of bytes that are already fp16: I/O-bound) ask for
    no CPU, at most one per actor (and per block) at a time. Beside GPU actors they keep Ray Data's
    defaults.
    """
    if fcfg.num_gpus > 0:
        return {}
    return {"ray_remote_args": {"num_cpus": 0}, "concurrency": max(1, min(pool[1], num_blocks))}


def clear_features(features_dir: str) -> List[str]:
    """``--overwrite``: remove what serray wrote as features (the identity and metadata files, the skip
    list, ``session=<n>`` partitions of Parquet files, temporaries of atomic writes) and nothing else.

    Raises:
        DataError: the directory holds anything else (another run's outputs, a corpus...): nothing is
            removed, and the error names what was found.
    """
    import re

    ours, foreign = [], []
    for p in storage.listdir(features_dir):
        name = storage.name(p)
        if name in (IDENTITY_FILE, META_FILE, SKIPPED_FILE, CONFIG_FILE) or re.fullmatch(r"\..+\.tmp-\d+-[0-9a-f]+", name):
            ours.append(p)
        elif re.fullmatch(r"session=\d+", name) and storage.is_dir(p):
            other = [f for f in storage.find_files(p, "") if not f.endswith(".parquet")]
            (foreign.extend(storage.name(f) for f in other) if other else ours.append(p))
        else:
            foreign.append(name + ("/" if storage.is_dir(p) else ""))
    if foreign:
        raise DataError(f"--overwrite would delete {storage.describe(features_dir)}, which holds more than serray's "
                        f"features: {', '.join(sorted(foreign)[:6])}{' ...' if len(foreign) > 6 else ''}; nothing was "
                        "removed. Choose another features.dir")
    for p in ours:
        storage.remove(p)
    return ours


def corpus_identity(cfg) -> dict:
    """The corpus a feature store holds: ``data.corpus`` and the absolute ``data.root``."""
    root = str(cfg.data.root)
    ident = {"name": str(cfg.data.corpus), "root": root if storage.is_uri(root) else str(Path(root).expanduser().resolve())}
    if ident["name"] == "pooled":  # several corpora: each member's corpus and root
        from serray.data.corpora.pooled import members

        ident["members"] = [{"corpus": m["corpus"], "root": str(Path(m["root"]).expanduser().resolve())}
                            for m in members(cfg.data)]
    return ident


def _corpus_text(c: dict) -> str:
    return f"data.corpus={c.get('name')} at {storage.redact(str(c.get('root')))}"


def check_corpus(meta: dict, cfg, where: str) -> None:
    """A clear error when stored features hold another corpus than the config names (stores written
    before the corpus was recorded pass: their rows are read through the current manifest anyway)."""
    found = meta.get("corpus")
    if found is not None and found != corpus_identity(cfg):
        raise DataError(f"{where} holds features of {_corpus_text(found)}, not of {_corpus_text(corpus_identity(cfg))}; "
                        "run `serray featurize` for this corpus in its own output_dir or features.dir")


def stored_identity(features_dir: str) -> Optional[dict]:
    """The encoder identity + config hash recorded in ``features_dir`` (the metadata of a finished run,
    else the identity an interrupted run wrote before its first partition), or None."""
    for name in (META_FILE, IDENTITY_FILE):
        path = storage.join(features_dir, name)
        if storage.is_file(path):
            try:
                found = json.loads(storage.read_text(path))
            except ValueError as e:
                raise DataError(f"{storage.describe(path)} is not valid JSON ({e}); delete it or the directory, "
                                "or pass --overwrite") from None
            if isinstance(found, dict):
                return found
    return None


#: A run is retried after an actor death at most this many times (each time with the batch that was
#: in progress taken apart and its culprit skipped); more means the encoder or the node is broken.
MAX_FAILED_BATCHES = 8


class _BatchTracker:
    """A tiny Ray actor (0 CPU): the utterances of batches that started and those that finished."""

    def __init__(self):
        self.started_ids, self.finished_ids = set(), set()

    def started(self, ids):
        self.started_ids.update(ids)

    def finished(self, ids):
        self.finished_ids.update(ids)

    def unfinished(self):
        return sorted(self.started_ids - self.finished_ids)


def _actor_died(e: BaseException) -> bool:
    """Whether a Ray Data failure is (or was caused by) an actor / worker process that died."""
    import ray.exceptions as rex

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (rex.RayActorError, rex.WorkerCrashedError)) or "actor died" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _encode(cfg, rows: pd.DataFrame, out_dir: str, pool: tuple[int, int], tracker=None) -> None:
    """One Ray Data job: ``rows`` -> :class:`EncodeBatch` actors (``pool``: min, max) -> Parquet
    partitioned by session.

    An actor that dies (a crash, the OOM killer, ``os._exit``) is restarted and its batch retried at
    most ``features.max_restarts`` times (Ray Data's default is forever, so one file that kills its
    actor would loop). Then the job fails, the actor is gone for good (no restart budget left, so
    nothing lingers holding resources), and the rows of the batches already written stay written.
    """
    import ray

    retries = int(cfg.features.max_restarts)
    blocks = _bucketed_blocks(rows[MANIFEST_COLUMNS], cfg.features.batch_size, 4 * pool[1])
    (path,), fs = storage.ray_paths([out_dir])
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter in Ray 2.60
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        # Ray Data bundles blocks shorter than a batch, so the writes may get fewer inputs than their cap
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'")
        ds = _map(ray, blocks, cfg, pool, tracker, retries)
        ds.write_parquet(path, filesystem=fs, partition_cols=["session"],
                         **write_remote_args(cfg.features, pool, len(blocks)))


def _map(ray, blocks, cfg, pool: tuple[int, int], tracker, retries: int):
    return ray.data.from_pandas(blocks).map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder_cfg": as_dict(cfg.encoder), "min_seconds": cfg.features.min_seconds,
                               "max_seconds": cfg.features.max_seconds, "fault_utt": cfg.features.fault_utt,
                               "tracker": tracker},
        batch_size=cfg.features.batch_size,
        batch_format="pandas",
        # all actors from the start: on 2 cores Ray Data's autoscaler added the second CPU actor ~15 s late
        # (888 s of audio, HuBERT-base: 162.5 s grown vs 146.9 s started at 2); an actor no node can host yet
        # stays pending without holding up the ones that run (min_size is still the floor)
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1],
                                           initial_size=max(pool[0], min(pool[1], len(blocks)))),
        num_cpus=cfg.features.num_cpus,
        num_gpus=cfg.features.num_gpus,
        max_restarts=retries,
        max_task_retries=retries,
    )


def _encode_one(encoder_cfg: dict, min_seconds: float, max_seconds: Optional[float], fault_utt: Optional[str],
                row: pd.DataFrame) -> pd.DataFrame:
    """A Ray task: one manifest row -> its feature row (or none); a worker that dies fails only this row."""
    return EncodeBatch(encoder_cfg, min_seconds, max_seconds, fault_utt)(row)


def _isolate(cfg, suspects: pd.DataFrame, out_dir: str) -> set:
    """Encode the rows of the batches that were in progress when their actor died, each in its own Ray
    task (``features.max_restarts`` retries): write the rows that work, return the utt_ids that fail."""
    import ray

    f = cfg.features
    task = ray.remote(_encode_one).options(num_cpus=f.num_cpus, num_gpus=f.num_gpus,
                                          max_retries=int(f.max_restarts), retry_exceptions=False)
    enc = as_dict(cfg.encoder)
    refs = {u: task.remote(enc, f.min_seconds, f.max_seconds, f.fault_utt, suspects[suspects["utt_id"] == u][MANIFEST_COLUMNS])
            for u in suspects["utt_id"]}
    good, failed = [], set()
    for utt, ref in refs.items():
        try:
            good.append(ray.get(ref))
        except Exception as e:  # the worker died max_restarts + 1 times, or the encoder raised
            log.warning("featurize: %s failed on its own: %s", utt, str(e).splitlines()[0][:200])
            failed.add(utt)
    good = [g for g in good if len(g)]
    if good:
        (path,), fs = storage.ray_paths([out_dir])
        ray.data.from_pandas(pd.concat(good, ignore_index=True)).write_parquet(path, filesystem=fs,
                                                                              partition_cols=["session"])
    return failed


def _encode_all(cfg, rows: pd.DataFrame, out_dir: str) -> set:
    """Featurize ``rows``; a file that keeps killing its actor is found and skipped. Returns those utt_ids.

    Each round is one Ray Data job. When an actor dies ``features.max_restarts + 1`` times the job
    fails; the batches that were in progress then (a :class:`_BatchTracker` knows which) are taken
    apart into one Ray task per row, the culprits among them are skipped, and the next round
    featurizes what is still missing. At most :data:`MAX_FAILED_BATCHES` rounds.
    """
    import ray

    f = cfg.features
    killed: set = set()
    todo = rows
    pool = actor_pool_bounds(f, ray.cluster_resources())
    log.info("featurize: %d to %d encoder actors", *pool)
    for _ in range(MAX_FAILED_BATCHES + 1):
        tracker = ray.remote(num_cpus=0)(_BatchTracker).remote()
        try:
            _encode(cfg, todo, out_dir, pool, tracker)
            return killed
        except Exception as e:
            if not _actor_died(e):
                raise
            unfinished = set(ray.get(tracker.unfinished.remote()))
            log.warning("featurize: an encoder actor died %d times; isolating the %d utterances of the batch(es) it "
                        "was working on", int(f.max_restarts) + 1, len(unfinished))
        finally:
            ray.kill(tracker)
        stored = set(stored_utterances(out_dir)["utt_id"])
        suspects = todo[todo["utt_id"].isin(unfinished - stored)]
        if suspects.empty:
            raise DataError("an encoder actor died outside any batch (while starting?); see the Ray worker logs")
        killed |= _isolate(cfg, suspects, out_dir)
        stored = set(stored_utterances(out_dir)["utt_id"])
        todo = todo[~todo["utt_id"].isin(stored | killed)]
        if todo.empty:
            return killed
    raise DataError(f"encoder actors died in more than {MAX_FAILED_BATCHES} rounds of featurization: the encoder or "
                    "the node is broken, not a file (see the Ray worker logs)")


def featurize(cfg, overwrite: bool = False) -> Dict[str, object]:
    """Featurize the manifest ``cfg.data.manifest`` into ``cfg.features.dir`` with Ray Data.

    The manifest's rows of ``cfg.data.sessions`` (with ``pretrain.use_unlabelled`` false, only its
    4-class rows) plus the extra audio of ``pretrain.extra_audio`` (partition ``session=0``).

    Args:
        cfg: the run config (sections data, encoder, features, pretrain, ray).
        overwrite: allow replacing features made with another encoder/config.

    Returns:
        A summary dict: rows written now, total stored, skipped utterances, seconds, per session
        (``rows_per_session``, ``labelled_rows_per_session``), extra-audio rows stored and removed.

    Raises:
        DataError: manifest missing, or stored features made with another encoder/config.
        ConfigError: an extra-audio source is missing, holds no audio or lists missing files.
    """
    out_dir = str(cfg.features.dir)
    manifest = read_manifest(cfg.data.manifest)
    manifest = manifest[manifest["session"].isin(list(cfg.data.sessions))]
    if manifest.empty:
        raise DataError(f"manifest {cfg.data.manifest} has no utterances in sessions {list(cfg.data.sessions)}")
    classes = classes_of(cfg)
    if not cfg.pretrain.use_unlabelled:  # a manifest built with keep_unlabelled: store what the config asks for
        manifest = manifest[manifest["label"].isin(classes)]
    extra_sources = [str(p) for p in cfg.pretrain.extra_audio]
    extra = extra_audio_manifest(extra_sources) if extra_sources else pd.DataFrame(columns=MANIFEST_COLUMNS)
    wanted = pd.concat([manifest[MANIFEST_COLUMNS], extra], ignore_index=True) if len(extra) else manifest
    # what changes the stored rows (extra_audio only adds or removes session-0 rows: not hashed)
    hashed = {k: as_dict(OmegaConf.select(cfg, k)) for k in FEATURE_HASH_KEYS}
    config_hash = section_hash(cfg, *FEATURE_HASH_KEYS)
    # one writer per features.dir (this machine; on object storage, runs on other machines are not seen)
    with storage.lock(out_dir, wait=False, what="another `serray featurize`, or training that reads it"):
        return _featurize(cfg, overwrite, out_dir, wanted, extra, extra_sources, hashed, config_hash, classes)


def _featurize(cfg, overwrite: bool, out_dir: str, wanted: pd.DataFrame, extra: pd.DataFrame, extra_sources: list,
               hashed: dict, config_hash: str, classes: tuple = LABELS) -> Dict[str, object]:
    from serray.ray_utils import init_ray, wait_for_node

    where = storage.describe(out_dir)
    meta_path = storage.join(out_dir, META_FILE)
    skipped_path = storage.join(out_dir, SKIPPED_FILE)
    old = stored_identity(out_dir)
    if old is None and storage.exists(out_dir) and parquet_files(out_dir):
        if not overwrite:
            raise DataError(f"{where} holds feature files but no record of the encoder that made them ({META_FILE} / "
                            f"{IDENTITY_FILE}): they may come from another encoder; choose another features.dir or "
                            "pass --overwrite")
        clear_features(out_dir)
    corpus = corpus_identity(cfg)
    if old is not None and old.get("corpus") not in (None, corpus):
        if not overwrite:
            raise DataError(f"{where} holds features of another corpus ({_corpus_text(old['corpus'])}); this config asks "
                            f"for {_corpus_text(corpus)}. One feature store holds one corpus: choose another output_dir "
                            "or features.dir, or pass --overwrite")
        clear_features(out_dir)
        old = None
    if old is not None and old.get("config_hash") != config_hash:
        if not overwrite:
            differ = [k for k in FEATURE_HASH_KEYS if k in (old.get("hashed") or {}) and old["hashed"][k] != hashed[k]]
            what = f"; they differ in {', '.join(differ)}" if differ else ""
            unfinished = "" if storage.is_file(meta_path) else " (an unfinished run)"
            raise DataError(
                f"{where} holds features{unfinished} made with encoder '{old.get('encoder')}' (config hash "
                f"{old.get('config_hash')}), but this config asks for encoder '{cfg.encoder.name}' "
                f"(hash {config_hash}){what}; choose another features.dir or pass --overwrite"
            )
        clear_features(out_dir)
        old = None
    encoder_meta = describe_encoder(cfg.encoder)
    if old is not None:  # same hash: the identity must agree as well
        check_identity(old, encoder_meta, f"features in {where}", "the config's encoder")
    storage.makedirs(out_dir)
    # the identity goes first, before any partition exists
    storage.write_text(storage.join(out_dir, IDENTITY_FILE),
                       json.dumps({**encoder_meta, "config_hash": config_hash, "hashed": hashed, "corpus": corpus}, indent=2))
    old_meta = read_meta(out_dir) if storage.is_file(meta_path) else {}

    def invalidate() -> None:
        """The partitions are about to change: the old metadata no longer vouches for them."""
        if storage.is_file(meta_path):
            storage.remove(meta_path)

    broken = _remove_broken_files(out_dir, invalidate)
    pruned = _prune_session(out_dir, EXTRA_SESSION, set(extra["utt_id"]), invalidate)  # sources no longer listed
    _prune_moved(out_dir, wanted, invalidate)
    done = stored_utterances(out_dir)
    pending = wanted[~wanted["utt_id"].isin(set(done["utt_id"]))]
    log.info("featurize: %d utterances wanted (%d extra audio), %d already stored, %d to do",
             len(wanted), len(extra), len(done), len(pending))

    start = time.time()
    # extra audio whose header says it is too short or too long (or unreadable) is skipped without a Ray job
    f = cfg.features
    header_skip = (pending["session"] == EXTRA_SESSION) & ~((pending["duration"] >= f.min_seconds)
                                                            & (pending["duration"] <= f.max_seconds))
    to_encode = pending[~header_skip]
    killed: set = set()
    if len(to_encode):
        invalidate()
        init_ray(cfg)
        wait_for_node({"CPU": float(f.num_cpus), "GPU": float(f.num_gpus)}, float(f.resource_timeout_s),
                      "an encoder actor (features.num_cpus / features.num_gpus)", "features.resource_timeout_s")
        killed = _encode_all(cfg, to_encode, out_dir)
    stored = stored_utterances(out_dir, columns=("utt_id", "label"))
    dup = int(stored["utt_id"].duplicated().sum())
    if dup:
        raise DataError(f"{where} holds {dup} duplicate utterances; delete the directory and featurize again")
    skipped = pending[~pending["utt_id"].isin(set(stored["utt_id"]))]
    if len(skipped):
        reasons = []
        for utt, path in zip(skipped["utt_id"], skipped["path"]):
            if utt in killed:
                reasons.append(f"the encoder failed or its actor died on this file, {int(f.max_restarts) + 1} times "
                               "(see the Ray worker log)")
            else:
                reasons.append(_skip_reason(path, cfg.encoder.sample_rate, f.min_seconds, f.max_seconds)
                               or "shorter than one encoder frame")
        skipped = skipped.assign(reason=reasons)[["utt_id", "session", "path", "reason"]]
        storage.write_text(skipped_path, skipped.to_csv(index=False))
        for row in skipped.itertuples():
            log.warning("skipped %s: %s", row.utt_id, row.reason)
    elif storage.exists(skipped_path):
        storage.remove(skipped_path)
    if stored.empty:
        raise DataError(f"featurization wrote no rows to {where}: every utterance was skipped (see {SKIPPED_FILE})")
    by_session = stored.groupby("session")
    rows_per_session = {str(k): int(v) for k, v in by_session.size().items()}
    labelled = {str(k): int(g["label"].isin(classes).sum()) for k, g in by_session}
    digests = {str(k): _utt_digest(g["utt_id"]) for k, g in by_session}
    old_stats = old_meta.get("stats") or {}
    stale = [s for s in rows_per_session if old_stats.get(s, {}).get("utt_digest") != digests[s]]
    if stale:
        init_ray(cfg)
    fresh = _session_stats(out_dir, [int(s) for s in stale])
    stats = {s: ({**fresh[s], "utt_digest": digests[s]} if s in stale else old_stats[s]) for s in rows_per_session}
    meta = {**encoder_meta, "dtype": "float16", "config_hash": config_hash, "hashed": hashed, "corpus": corpus,
            "num_rows": int(len(stored)), "rows_per_session": rows_per_session,
            "labelled_rows_per_session": labelled, "extra_audio": extra_sources, "labels": list(classes),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stats": stats}
    storage.write_text(storage.join(out_dir, CONFIG_FILE), to_yaml(cfg))  # '_' so Parquet readers skip it
    _write_meta(out_dir, meta)  # last: the "done" marker of the whole directory
    return {"written": int(len(stored) - len(done)), "stored": int(len(stored)), "skipped": int(len(skipped)),
            "removed_broken_files": broken, "seconds": round(time.time() - start, 2),
            "rows_per_session": meta["rows_per_session"], "labelled_rows_per_session": labelled,
            "extra_rows": int(rows_per_session.get(str(EXTRA_SESSION), 0)), "removed_extra_rows": pruned,
            "features_dir": out_dir, "encoder": meta}


def featurize_summary(s: dict) -> str:
    """Two lines for the terminal: what is stored, what was computed now, the encoder."""
    enc = s["encoder"]
    per = ", ".join(f"S{k}: {v}" for k, v in sorted(s["rows_per_session"].items()))
    return (f"features: {s['stored']} utterances in {storage.describe(s['features_dir'])} ({per}); "
            f"{s['written']} computed now in {s['seconds']} s, {s['skipped']} skipped"
            + ("; S0 = pretrain.extra_audio (pre-training only)" if s.get("extra_rows") else "") + "\n"
            f"encoder: {enc['encoder']} layers={enc['layers']} dim={enc['dim']} frame_rate={enc['frame_rate']} Hz, float16")


# ---------------------------------------------------------------- a training run's hold on the store


def check_features(cfg) -> dict:
    """The feature metadata, checked against the config's encoder (a clear error naming both)."""
    meta = read_meta(cfg.features.dir)
    check_identity(meta, describe_encoder(cfg.encoder), f"features in {cfg.features.dir}", f"config encoder.name={cfg.encoder.name}")
    check_corpus(meta, cfg, f"features in {storage.describe(cfg.features.dir)}")
    return meta


@contextlib.contextmanager
def reading_features(cfg):
    """A training run's hold on ``features.dir``: a shared lock for its duration (on this machine a
    concurrent ``serray featurize`` is refused, and this run is refused while one writes), and the
    feature metadata compared before and after (a re-featurization from another machine, which the
    lock cannot see, fails the run instead of mixing features)."""
    before = _meta_text(cfg.features.dir)
    with storage.lock(cfg.features.dir, shared=True, wait=False, what="a `serray featurize` writing it"):
        yield
    if _meta_text(cfg.features.dir) != before:
        raise DataError(f"the features in {storage.describe(cfg.features.dir)} changed while this run read them "
                        "(a re-featurization ran meanwhile); run it again")


def _meta_text(features_dir: str) -> Optional[str]:
    from serray.data.features.featurize import META_FILE

    path = storage.join(features_dir, META_FILE)
    return storage.read_text(path) if storage.is_file(path) else None


# ---------------------------------------------------------------- the driver
