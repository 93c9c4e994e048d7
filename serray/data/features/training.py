"""Reading stored features for training: Ray Datasets per session and the padding collate.

Training never loads the corpus into one process: a :func:`feature_dataset` is a lazy Ray Dataset
over the session partitions, consumed on each Train worker with ``iter_torch_batches`` and
:class:`PadCollate`, which decodes the float16 bytes, optionally crops long utterances, pads to the
longest one in the batch and builds the padding mask.
"""

from __future__ import annotations

import functools
import math

from pathlib import Path
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from serray import storage
from serray.data.features.featurize import parquet_files, read_meta
from serray.data.features.stored import decode_feature
from serray.data.corpora.base import LABELS
from serray.errors import DataError

TRAIN_COLUMNS = ["utt_id", "label", "speaker", "num_frames", "dim", "num_layers", "feat"]
LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
UNLABELLED = -1  # label index of rows without a 4-class label (label "")
ROW_COLUMNS = ("utt_id", "feat", "num_frames", "dim", "num_layers", "label")


def session_paths(features_dir: str | Path, sessions: Iterable[int]) -> List[str]:
    """Parquet files of the given sessions; a clear error when there are none."""
    meta = read_meta(features_dir)  # raises when the directory is not a feature store
    files = [f for s in sorted(set(sessions)) for f in parquet_files(features_dir, s)]
    if not files:
        raise DataError(f"no feature files for sessions {sorted(set(sessions))} in {storage.describe(features_dir)} "
                        f"(it holds sessions {sorted(meta.get('rows_per_session', {}))})")
    return files


class Rows:
    """Stored feature rows kept compact in memory: float16 bytes plus shape and label columns,
    in canonical order (sorted by ``utt_id``), so a seeded permutation picks the same utterances
    however the feature files were cut into blocks.

    ``Rows.take(idx)`` gives the dict of numpy columns that :class:`~serray.data.features.training.PadCollate`
    turns into a padded batch, so nothing is decoded or padded before it is needed.
    """

    def __init__(self, columns: Dict[str, np.ndarray]):
        ids = columns.get("utt_id")
        if ids is not None and len(ids) > 1:
            order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
            if (order != np.arange(len(order))).any():
                columns = {k: v[order] for k, v in columns.items()}
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["num_frames"])

    @classmethod
    def from_batches(cls, batches: Iterable[Dict[str, Any]]) -> "Rows":
        parts: Dict[str, list] = defaultdict(list)
        for b in batches:
            for k in ROW_COLUMNS:
                if k in b:
                    parts[k].append(np.asarray(b[k], dtype=object if k in ("feat", "label", "utt_id") else None))
        cols = {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}
        return cls(cols)

    def take(self, idx: np.ndarray) -> Dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.columns.items()}

    def lengths(self) -> np.ndarray:
        return self.columns["num_frames"].astype(np.int64)


class TrainingData:
    """The rows a training stage reads, and how.

    ``mode == "memory"`` (the selection is below ``features.cache_max_mb``): the rows are read once
    with pyarrow (no Ray task, so it also works inside a Tune trial); the loop keeps them as compact
    float16 bytes in utterance-id order and shuffles them itself every epoch (see
    :mod:`serray.train.loop`).
    ``mode == "stream"``: a lazy Ray Dataset over the Parquet files sorted by a seeded hash of the
    utterance id (:func:`stream_order_key`): a shuffled order that depends on the utterances and the
    seed only, not on how the files were cut into blocks (the same order every epoch).
    """

    def __init__(self, mode: str, table=None, dataset=None):
        self.mode, self.table, self._dataset = mode, table, dataset

    def __len__(self) -> int:
        return self.table.num_rows if self.table is not None else self._dataset.count()

    def ray_dataset(self):
        """A Ray Dataset for Ray Train workers (``from_arrow`` blocks in memory mode)."""
        if self._dataset is not None:
            return self._dataset
        import ray.data

        per_block = max(1, math.ceil(self.table.num_rows / 8))
        return ray.data.from_arrow([self.table.slice(i, per_block) for i in range(0, self.table.num_rows, per_block)]
                                   or [self.table])

    def rows(self):
        """The rows in this process (memory mode): a :class:`Rows`."""
        if self.table is None:
            raise ValueError("stream-mode training data has no in-memory rows")
        t = self.table
        return Rows({"utt_id": _object_array(t.column("utt_id").to_pylist()), "feat": binary_views(t.column("feat")),
                     "num_frames": t.column("num_frames").to_numpy(), "dim": t.column("dim").to_numpy(),
                     "num_layers": t.column("num_layers").to_numpy(),
                     "label": _object_array(t.column("label").to_pylist())})


def _object_array(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def binary_views(column) -> np.ndarray:
    """The values of an Arrow binary column as an object array of zero-copy ``pyarrow.Buffer`` slices
    (``np.frombuffer`` reads them like ``bytes``), so the features are held once: in the Arrow table.

    ``column.to_pylist()`` would copy every row into a Python ``bytes``, doubling what a training
    process holds (the table stays referenced by the caller and the read cache)."""
    import pyarrow as pa

    out = np.empty(len(column), dtype=object)
    i = 0
    for chunk in getattr(column, "chunks", [column]):
        n = len(chunk)
        if chunk.null_count or not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            out[i : i + n] = chunk.to_pylist()  # rare layouts: plain copies
        else:
            _, offsets, values = chunk.buffers()
            if values is None:  # every value of the chunk is empty
                out[i : i + n] = [b""] * n
            else:
                offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
                offsets = np.frombuffer(offsets, dtype=offset_type)[chunk.offset : chunk.offset + n + 1]
                for j in range(n):
                    out[i + j] = values.slice(int(offsets[j]), int(offsets[j + 1] - offsets[j]))
        i += n
    return out


def training_data(features_dir: str | Path, sessions: Iterable[int], utt_ids: Optional[Sequence[str]] = None,
                  cache_max_mb: float = 0.0, seed: int = 0) -> TrainingData:
    """The training rows of some sessions (optionally some utterances) for the shared loop.

    Args:
        features_dir: a directory written by ``serray featurize`` (local or a storage URI).
        sessions: sessions to read (0 = ``pretrain.extra_audio``).
        utt_ids: keep only these utterances (e.g. a fold's training split).
        cache_max_mb: selections whose Parquet files are smaller than this are held in memory.
        seed: the seed of the stream-mode shuffle.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    files = session_paths(features_dir, sessions)
    size_mb = sum(storage.size(f) for f in files) / 2**20
    if size_mb <= cache_max_mb:
        if utt_ids is None or size_mb <= SHARED_TABLE_MB:
            table = _read_table(tuple(files))  # small: read once, shared by the folds of this process
            if utt_ids is not None:
                table = table.filter(pc.is_in(table["utt_id"], value_set=pa.array(list(utt_ids), pa.string())))
        else:  # e.g. a validation split of HuBERT-large features: keep only its rows, batch by batch
            table = _read_rows(files, list(utt_ids))
        return TrainingData("memory", table=table)
    import ray.data
    from ray.data.expressions import col

    # fractional CPUs: reads must fit beside Train workers and other folds on small machines
    paths, fs = storage.ray_paths(files)
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=TRAIN_COLUMNS, partitioning=None, num_cpus=0.25)
    if utt_ids is not None:
        ds = ds.filter(expr=col("utt_id").is_in(list(utt_ids)))  # pushed down into the Parquet read
    keyed = ds.map_batches(_StreamKey(int(seed)), batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    return TrainingData("stream", dataset=keyed.sort(STREAM_KEY))


STREAM_KEY = "_order"


def stream_order_key(utt_ids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per utterance id (blake2b of ``seed:utt_id``): sorting by it is a
    shuffle that depends only on the ids and the seed (Python's ``hash`` is salted per process)."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest(), "little")
                     for u in utt_ids], dtype=np.uint64)


class _StreamKey:
    """Ray Data map: add the :func:`stream_order_key` column to a block."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, table):
        import pyarrow as pa

        key = stream_order_key(table.column("utt_id").to_pylist(), self.seed)
        return table.append_column(STREAM_KEY, pa.array(key, pa.uint64()))


#: Selections from files up to this size are cut from one cached table of all their rows; above it
#: only the selected rows are ever held (a fold's validation split of GBs of features).
SHARED_TABLE_MB = 256.0


def _read_rows(files: Sequence[str], utt_ids: Sequence[str]):
    """The training columns of the rows ``utt_ids`` of some feature files, filtered record batch by
    record batch (memory: the selected rows plus one batch)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pa.array(list(utt_ids), pa.string())
    parts = []
    for f in files:
        for rb in storage.parquet_file(f).iter_batches(batch_size=256, columns=TRAIN_COLUMNS):
            rb = rb.filter(pc.is_in(rb.column("utt_id"), value_set=keep))
            if rb.num_rows:
                parts.append(rb)
    if not parts:
        return pa.Table.from_batches([], schema=storage.parquet_file(files[0]).schema_arrow.select(TRAIN_COLUMNS))
    return pa.Table.from_batches(parts)


@functools.lru_cache(maxsize=2)
def _read_table(files: tuple):
    """The training columns of some feature files as one Arrow table (cached: folds share it)."""
    import pyarrow as pa

    return pa.concat_tables([storage.parquet_file(f).read(columns=TRAIN_COLUMNS) for f in files])


def pad_features(feats: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [T, D] (or [L, T, D]) arrays into a zero-padded float32 batch plus a padding mask.

    Returns:
        ``x`` [B, T, D] or [B, L, T, D] and ``padding_mask`` bool [B, T] (True = padded).
    """
    lengths = [f.shape[-2] for f in feats]
    t_max = max(lengths)
    shape = (len(feats),) + feats[0].shape[:-2] + (t_max, feats[0].shape[-1])
    x = np.zeros(shape, dtype=np.float32)
    for i, f in enumerate(feats):
        x[i, ..., : f.shape[-2], :] = f
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(t_max)[None, :] >= lengths_t[:, None]
    return torch.from_numpy(x), mask


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate: stored rows -> ``{"x", "padding_mask", "labels"}`` tensors (label "" -> -1).

    Args:
        max_frames: crop longer utterances to this many frames (None: no crop).
        random_crop: pick the crop window at random (training) or take the centre (evaluation).
        seed: seed of the crop RNG.
        classes: the run's classes in index order (``data.classes``; default the four).
        with_labels: False: every row's label is -1 (pre-training reads no class).
    """

    def __init__(self, max_frames: Optional[int] = None, random_crop: bool = True, seed: int = 0,
                 classes: Optional[Sequence[str]] = None, with_labels: bool = True):
        self.with_labels = with_labels
        self.max_frames = max_frames
        self.random_crop = random_crop
        self.rng = np.random.default_rng(seed)
        self.index = LABEL_INDEX if classes is None else {label: i for i, label in enumerate(classes)}

    def _crop(self, f: np.ndarray) -> np.ndarray:
        t = f.shape[-2]
        if self.max_frames is None or t <= self.max_frames:
            return f
        start = int(self.rng.integers(0, t - self.max_frames + 1)) if self.random_crop else (t - self.max_frames) // 2
        return f[..., start : start + self.max_frames, :]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        feats = [
            self._crop(decode_feature(b, int(t), int(d), int(l)))
            for b, t, d, l in zip(batch["feat"], batch["num_frames"], batch["dim"], batch["num_layers"])
        ]
        x, mask = pad_features(feats)
        # "" = no class (pre-training rows): -1
        labels = torch.tensor([UNLABELLED if str(l) == "" or not self.with_labels else self.index[str(l)]
                               for l in batch["label"]],
                              dtype=torch.long)
        return {"x": x, "padding_mask": mask, "labels": labels}


def read_rows(features_dir: str | Path, sessions: Iterable[int], columns: Sequence[str] = ("utt_id", "label", "speaker")):
    """Small metadata columns of some sessions as a pandas frame (no features), sorted by ``utt_id``
    (canonical: not the order the featurization happened to write them in), with each row's
    ``session`` (fold group, from its partition). Columns the files do not store are left out."""
    import pandas as pd

    from serray.data.features.stored import session_of

    columns = list(columns) if "utt_id" in columns else ["utt_id", *columns]
    frames = []
    for f in session_paths(features_dir, sessions):
        pf = storage.parquet_file(f)
        have = [c for c in columns if c in pf.schema_arrow.names]
        frames.append(pf.read(columns=have).to_pandas().assign(session=session_of(f)))
    return pd.concat(frames, ignore_index=True).sort_values("utt_id", kind="stable").reset_index(drop=True)
