"""cosine_schedule: linear warm-up, cosine endpoints, monotonicity (learning rate and EMA decay)."""

from __future__ import annotations

import math

import pytest

from serray.train.schedules import cosine_schedule


def _values(base, final, total, warmup, steps=None):
    return [cosine_schedule(base, final, total, warmup, s) for s in range(steps if steps is not None else total + 1)]


def test_warmup_is_linear_up_to_base() -> None:
    base, warmup = 1e-3, 10
    vals = _values(base, 0.0, 100, warmup, steps=warmup)
    # linear ramp ending at base on the last warm-up step
    assert vals[0] == pytest.approx(base / warmup)
    assert vals[-1] == pytest.approx(base)
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d == pytest.approx(base / warmup) for d in diffs)
    # every warm-up value is below base and positive
    assert all(0.0 < v <= base for v in vals)


def test_endpoints_after_warmup() -> None:
    base, final, total, warmup = 1e-3, 1e-5, 100, 10
    assert cosine_schedule(base, final, total, warmup, warmup) == pytest.approx(base)
    assert cosine_schedule(base, final, total, warmup, total) == pytest.approx(final)
    # clamped after the end
    assert cosine_schedule(base, final, total, warmup, total + 50) == pytest.approx(final)
    # half-way through the cosine: the mean of the endpoints
    mid = warmup + (total - warmup) // 2
    assert cosine_schedule(base, final, total, warmup, mid) == pytest.approx((base + final) / 2)


def test_no_warmup_starts_at_base() -> None:
    assert cosine_schedule(0.5, 0.1, 10, 0, 0) == pytest.approx(0.5)
    assert cosine_schedule(0.5, 0.1, 10, 0, 10) == pytest.approx(0.1)


def test_lr_decreases_monotonically_after_warmup() -> None:
    base, final, total, warmup = 1e-3, 0.0, 200, 20
    vals = _values(base, final, total, warmup)
    after = vals[warmup:]
    assert all(b <= a + 1e-15 for a, b in zip(after, after[1:]))
    assert all(final - 1e-15 <= v <= base + 1e-15 for v in after)


def test_ema_decay_rises_monotonically_from_base_to_final() -> None:
    """EMA decay (base < final, no warm-up): starts at base, never decreases, ends at final."""
    base, final, total = 0.996, 0.9999, 137
    vals = _values(base, final, total, 0)
    assert vals[0] == pytest.approx(base)
    assert vals[-1] == pytest.approx(final)
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert all(base <= v <= final for v in vals)
    assert vals[1] > vals[0] and vals[-1] > vals[-2]


@pytest.mark.parametrize("total, warmup", [(0, 0), (1, 0), (5, 5), (3, 10)])
def test_degenerate_lengths_are_finite(total, warmup) -> None:
    """total <= warmup or a zero-length schedule must not divide by zero."""
    for s in range(0, max(total, warmup) + 3):
        v = cosine_schedule(1.0, 0.1, total, warmup, s)
        assert math.isfinite(v)
        assert 0.0 < v <= 1.0
