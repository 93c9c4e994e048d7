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
