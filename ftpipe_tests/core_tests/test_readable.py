"""Numbers as the UI shows them."""

from ftpipe.core import readable


def test_floats_keep_four_significant_digits() -> None:
    assert readable.rounded(0.26326375007629393) == 0.2633
    assert readable.rounded(0.20833333333333334) == 0.2083
    assert readable.rounded(0.0005) == 0.0005
    assert readable.rounded(-1234.5678) == -1235.0


def test_counts_and_sizes_carry_a_unit() -> None:
    assert readable.count(134515008) == "134.5M"
    assert readable.count(950) == "950"
    assert readable.count(2_400) == "2.4k"
    assert readable.size(1536) == "1.5 KiB"
    assert readable.size(12) == "12 B"
    assert readable.size(3 * 2**30) == "3.0 GiB"


def test_durations_read_in_seconds_minutes_or_hours() -> None:
    assert readable.duration(42.4) == "42 s"
    assert readable.duration(1079) == "18 min"
    assert readable.duration(4500) == "1 h 15 min"
