"""Tests for serray.data.features: label handling of PadCollate (no Ray job)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serray.data.features import LABEL_INDEX, UNLABELLED, PadCollate


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
    import serray.data.features as F

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
