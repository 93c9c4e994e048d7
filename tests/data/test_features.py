"""Tests for serray.data.features.training: label handling of PadCollate (no Ray job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serray.data.features.training import LABEL_INDEX, UNLABELLED, PadCollate


def _batch(labels, frames=(3, 5), dim=4):
    feats = [np.arange(t * dim, dtype=np.float16).reshape(t, dim) for t in frames]
    return {"feat": np.array([f.tobytes() for f in feats], dtype=object), "num_frames": np.array(frames),
            "dim": np.full(len(frames), dim), "num_layers": np.ones(len(frames), dtype=np.int64),
            "label": np.array(labels, dtype=object)}


def test_unlabelled_rows_get_minus_one():
    assert LABEL_INDEX == {"neu": 0, "hap": 1, "sad": 2, "ang": 3} and UNLABELLED == -1
    out = PadCollate()(_batch(["", "sad", "", "neu", "ang", "hap"], frames=(3, 5, 2, 4, 1, 6)))
    assert out["labels"].dtype == torch.long
    assert out["labels"].tolist() == [-1, 2, -1, 0, 3, 1]
    assert out["x"].shape == (6, 6, 4)
    assert out["padding_mask"].sum(1).tolist() == [3, 1, 4, 2, 5, 0]
    np.testing.assert_array_equal(out["x"][1, :5].numpy(), np.arange(20, dtype=np.float32).reshape(5, 4))


def test_unknown_label_is_still_an_error():
    with pytest.raises(KeyError):
        PadCollate()(_batch(["fru", "neu"]))


@pytest.mark.slow
def test_large_selections_keep_only_their_rows(featurized, monkeypatch):
    """A selection from files above SHARED_TABLE_MB is read batch by batch, keeping only its rows, and
    gives the same rows as the cached path."""
    import serray.data.features.training as F

    meta_rows = F.read_rows(featurized.features.dir, [1, 2], columns=("utt_id",))
    ids = meta_rows["utt_id"].tolist()[::3]
    cached = F.training_data(featurized.features.dir, [1, 2], ids, cache_max_mb=1e9).table
    monkeypatch.setattr(F, "SHARED_TABLE_MB", 0.0)
    F._read_table.cache_clear()
    streamed = F.training_data(featurized.features.dir, [1, 2], ids, cache_max_mb=1e9).table
    assert F._read_table.cache_info().currsize == 0  # the whole table was never read
    assert sorted(streamed["utt_id"].to_pylist()) == sorted(cached["utt_id"].to_pylist()) == sorted(ids)
    a = dict(zip(cached["utt_id"].to_pylist(), cached["feat"].to_pylist()))
    assert all(a[u] == f for u, f in zip(streamed["utt_id"].to_pylist(), streamed["feat"].to_pylist()))


def test_in_memory_rows_hold_the_features_once_in_the_arrow_table():
    """``TrainingData.rows()`` used to copy every feature into a Python ``bytes`` beside the Arrow
    table the caller and the read cache keep: twice the memory of the cached set (366 MB more on the
    IEMOCAP-sized fbank pre-training pool). Its rows must now be views of the table's buffers."""
    import pyarrow as pa

    from serray.data.features.training import TrainingData
    from serray.data.features.stored import decode_feature

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((t, 3)).astype(np.float16) for t in (4, 7, 1, 5, 2)]

    def table(part, kind, first=0):
        return pa.table({"utt_id": [f"u{first + i}" for i in range(len(part))],
                         "feat": pa.array([f.tobytes() for f in part], kind),
                         "num_frames": pa.array([len(f) for f in part], pa.int64()),
                         "dim": pa.array([3] * len(part), pa.int64()), "num_layers": pa.array([1] * len(part), pa.int64()),
                         "label": pa.array(["sad", ""][: len(part)] + ["neu"] * (len(part) - 2), pa.string())})

    for kind in (pa.binary(), pa.large_binary()):
        # two chunks, the second a slice with a non-zero offset (a filtered / sliced table)
        t = pa.concat_tables([table(feats[:2], kind), table([feats[0]] + feats[2:], kind, first=1).slice(1)])
        assert t.column("feat").num_chunks == 2 and t.column("feat").chunks[1].offset == 1
        rows = TrainingData("memory", table=t).rows()
        assert len(rows) == 5
        assert rows.columns["num_frames"].tolist() == [4, 7, 1, 5, 2]
        assert rows.columns["label"].tolist() == ["sad", "", "", "neu", "neu"]
        spans = [(b.address, b.address + b.size) for c in t.column("feat").chunks for b in c.buffers()[2:]]
        for got, want, t_ in zip(rows.columns["feat"], feats, [4, 7, 1, 5, 2]):
            arr = decode_feature(got, t_, 3)
            np.testing.assert_array_equal(arr, want)
            assert any(lo <= arr.ctypes.data < hi for lo, hi in spans), "a feature was copied out of the table"
