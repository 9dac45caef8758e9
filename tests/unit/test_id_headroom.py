"""sensor_id_headroom_ratio's arithmetic and when its warnings fire (the gauge itself is read
from a real adopted database in tests/migration/test_widen_ids.py)."""

from __future__ import annotations

from sensor_predictor.widen_ids import crossed, headroom

INT_MAX = 2**31 - 1


def test_headroom_is_the_share_of_the_type_still_free() -> None:
    assert headroom(INT_MAX, 0) == 1.0
    assert abs(headroom(INT_MAX, INT_MAX // 2) - 0.5) < 1e-9
    assert headroom(INT_MAX, INT_MAX) == 0.0
    assert headroom(INT_MAX, INT_MAX + 10) == 0.0  # never negative
    assert headroom(2**63 - 1, 10**9) > 0.99999


def test_a_warning_at_each_threshold_crossed_once() -> None:
    assert crossed(None, 0.9) is None
    assert crossed(None, 0.4) == 0.5          # already below a half when first seen
    assert crossed(None, 0.05) == 0.1         # the lowest threshold crossed
    assert crossed(0.6, 0.49) == 0.5
    assert crossed(0.49, 0.48) is None        # no repeat while it stays below
    assert crossed(0.2, 0.09) == 0.1
    assert crossed(0.09, 0.08) is None
    assert crossed(0.6, 0.05) == 0.1          # both at once: the lower one
