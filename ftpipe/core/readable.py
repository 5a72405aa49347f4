"""Numbers as people read them: floats to four significant digits, counts, byte sizes and durations with a unit.

Files keep exact values; what the UI and the logs show goes through here.
"""

from __future__ import annotations

SIGNIFICANT = 4
COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))
SIZE_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def rounded(value: float) -> float:
    """`value` to four significant digits (0.26326375 -> 0.2633, 0.0005 stays 0.0005)."""
    return float(f"{value:.{SIGNIFICANT}g}")


def plural(number: int, noun: str) -> str:
    """`number` with `noun`, in the plural unless it is one: '1 row', '3 rows'."""
    return f"{number} {noun}{'s' * (number != 1)}"


def count(value: int) -> str:
    """A count with a unit suffix: 134515008 -> '134.5M', 950 -> '950'."""
    for size, unit in COUNT_UNITS:
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def size(value: int) -> str:
    """A byte size: 1536 -> '1.5 KiB', 12 -> '12 B'."""
    for unit_size, unit in SIZE_UNITS:
        if value >= unit_size:
            return f"{value / unit_size:.1f} {unit}"
    return f"{value} B"


def duration(seconds: float) -> str:
    """A time span: 42.4 -> '42 s', 1079 -> '18 min', 4500 -> '1 h 15 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
