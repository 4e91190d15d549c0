"""Rate control (`neucodec.rate`): which operating point fits a file's target bitrate."""
from __future__ import annotations

import pytest

from neucodec.errors import UnsupportedSetting
from neucodec.rate import (
    HEADER_BYTES,
    OperatingPoint,
    choose,
    frontier,
    header_kbps,
    minimum_kbps,
    natural_points,
    needs_kbps,
    within_target,
)

POINTS = [
    OperatingPoint(2, None, False, 1.6, 1.6, 1.3),
    OperatingPoint(2, "e4", False, 4.2, 4.6, 2.9),
    OperatingPoint(4, None, False, 3.1, 3.1, 1.8),
    OperatingPoint(4, "e4", False, 5.6, 6.0, 3.2),
    OperatingPoint(4, "e4", True, 4.6, 5.1, 3.2),
    OperatingPoint(8, "e4", False, 8.6, 9.0, 3.4),
]


def test_the_best_point_within_the_target_wins() -> None:
    assert choose(POINTS, 6.0).describe() == "4 codebooks + e4 correction"
    assert choose(POINTS, 5.0) == POINTS[1]  # 2 codebooks + correction beat 4 codebooks without it
    assert choose(POINTS, 5.2, lm=True) == POINTS[4]  # the LM makes room for more codebooks
    assert choose(POINTS, 3.5) == POINTS[2]
    assert choose(POINTS, 100) == POINTS[-1]


def test_a_point_fits_on_average_and_at_its_95th_percentile_within_the_tolerance() -> None:
    assert needs_kbps(POINTS[3]) == pytest.approx(max(5.6 - 0.1, (6.0 - 0.1) / 1.05))
    assert needs_kbps(POINTS[1]) == pytest.approx((4.6 - 0.1) / 1.05)  # the high rate decides: 4.29
    assert choose(POINTS, 4.28) == POINTS[2] and choose(POINTS, 4.3) == POINTS[1]


def test_channels_and_a_short_file_share_the_target() -> None:
    assert choose(POINTS, 11.4, channels=2) == POINTS[3]  # 12 kbps at the 95th percentile: within 5 % + 0.1
    assert choose(POINTS, 11.3, channels=2) == POINTS[1]
    assert header_kbps(5.0) == pytest.approx(8 * HEADER_BYTES / 5 / 1000) and header_kbps(None) == 0
    assert choose(POINTS, 6.0, seconds=2.0) == POINTS[1]  # the header takes 0.64 kbps of a 2 s file


def test_a_target_below_every_point_names_the_minimum() -> None:
    with pytest.raises(UnsupportedSetting, match=r"bandwidth=1 is below .* use bandwidth=1.5 or more"):
        choose(POINTS, 1.0)
    assert minimum_kbps(POINTS, channels=2) == 3.1
    assert minimum_kbps(POINTS, seconds=10.0) == 1.7  # 1.6 - 0.1 + 0.192 of header
    with pytest.raises(UnsupportedSetting, match="no operating point below"):
        choose(POINTS, 9.0, below=POINTS[0])
    assert choose(POINTS, 9.0, below=POINTS[5]) == POINTS[3]


def test_natural_points_of_a_checkpoint_are_its_bandwidths() -> None:
    points = natural_points([1.5, 3.0, 6.0, 12.0, 24.0], 750, lm=True)
    assert [p.codebooks for p in points if not p.lm] == [2, 4, 8, 16, 32]
    assert choose(points, 7.0).codebooks == 8 and not choose(points, 7.0).lm
    assert choose(points, 7.0, lm=True).codebooks == 8 and choose(points, 7.0, lm=True).lm


def test_frontier_lists_the_points_worth_choosing() -> None:
    assert frontier(POINTS) == [POINTS[0], POINTS[2], POINTS[1], POINTS[3], POINTS[5]]
    assert POINTS[4] in frontier(POINTS, lm=True)


def test_within_target_allows_five_percent_and_a_tenth_of_a_kbps() -> None:
    assert within_target(int(3.25 * 1000 * 10 / 8), 10.0, 3.0)
    assert not within_target(int(3.3 * 1000 * 10 / 8), 10.0, 3.0)
