"""Sizes, rates and durations as people write them (``50MB``, ``20MiB/s``, ``1h30m``), and back.

Units say what they are: ``KB``/``MB``/``GB``/``TB``/``PB`` are decimal (powers of 1000), ``KiB``/``MiB``/...
binary (powers of 1024). A bare ``K``/``M``/``G``/``T``/``P`` is binary, as in ``dd``, ``rsync`` and systemd. Units
are case-insensitive and may be separated from the number by spaces. The parsers raise :class:`ValueError` with
one line naming the bad text and the forms accepted; callers that read user input wrap it in a
:class:`~duet_core.errors.DuetError` with the place it came from.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext

_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_p] = 1024**_i
    _SIZE_UNITS[_p + "b"] = 1000**_i
    _SIZE_UNITS[_p + "ib"] = 1024**_i

_DURATION_UNITS: dict[str, float] = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}

MAX_SIZE = (1 << 63) - 1   # 8 EiB: sizes become C off_t / int64 values (offsets, rates, fadvise ranges)
UNLIMITED = ("0", "unlimited", "none")  # rate spellings meaning "no limit"

SIZE_FORMS = "a number of bytes, optionally with a unit B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB, P/PB/PiB (e.g. 50MB)"
RATE_FORMS = "a size per second like 50MB/s or 20M, or 0/unlimited/none for no limit"
DURATION_FORMS = "seconds, or numbers with units s, m/min, h, d, w, combined like 1h30m (e.g. 30d)"

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*", re.IGNORECASE)
_DURATION_PART_RE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)", re.IGNORECASE)


def _number(value: object, what: str, forms: str) -> Decimal | None:
    """A non-negative finite int/float passed in directly (as TOML gives them), or None if ``value`` is text."""
    if isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bad {what} {value!r}: expected {forms}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"bad {what} {value!r}: must be a finite number; expected {forms}")
    if value < 0:
        raise ValueError(f"bad {what} {value!r}: must not be negative; expected {forms}")
    return Decimal(value)


def parse_size(text: str | int) -> int:
    """``"50MB"`` → 50_000_000, ``"4 KiB"`` → 4096, ``"1.5G"`` → 1610612736, ``"512"`` → 512 (bytes).

    A fraction of a unit is rounded down to whole bytes; a fraction of a byte (``"1.5"``, ``"0.5B"``) is refused.
    """
    value = _number(text, "size", SIZE_FORMS)
    unit = "b"
    if value is None:
        m = _SIZE_RE.fullmatch(text)
        if not m or m[2].lower() not in _SIZE_UNITS:
            why = "must not be negative; " if text.lstrip().startswith("-") else ""
            raise ValueError(f"bad size {text!r}: {why}expected {SIZE_FORMS}")
        value, unit = Decimal(m[1]), m[2].lower()
    with localcontext() as exact:   # Decimal's default 28 digits would round big products silently
        exact.prec = 400
        total = value * _SIZE_UNITS[unit or "b"]
    if total > MAX_SIZE:
        raise ValueError(f"bad size {text!r}: larger than 8 EiB; expected {SIZE_FORMS}")
    if _SIZE_UNITS[unit or "b"] == 1 and total != total.to_integral_value():
        raise ValueError(f"bad size {text!r}: not a whole number of bytes; expected {SIZE_FORMS}")
    return int(total)


def parse_rate(text: str | int) -> int | None:
    """``"50MB/s"`` or ``"50MB"`` → bytes per second; ``"0"``, ``"unlimited"``, ``"none"`` (or any zero) → None."""
    body = text
    if isinstance(text, str):
        body = text.strip()
        if body.lower() in UNLIMITED:
            return None
        if body.lower().endswith("/s"):
            body = body[:-2]
    try:
        rate = parse_size(body)
    except ValueError as exc:
        why = "must not be negative; " if "negative" in str(exc) else ""
        raise ValueError(f"bad rate {text!r}: {why}expected {RATE_FORMS}") from None
    return rate or None


def parse_duration(text: str | int | float) -> float:
    """``"30d"`` → 2592000.0, ``"1h30m"`` (or ``"1h 30m"``) → 5400.0, ``"90"`` → 90.0 (seconds).

    Each unit may appear once; a bare number is allowed only on its own.
    """
    value = _number(text, "duration", DURATION_FORMS)
    if value is not None:
        return float(value)
    why = "must not be negative; " if text.lstrip().startswith("-") else ""
    bad = ValueError(f"bad duration {text!r}: {why}expected {DURATION_FORMS}")
    parts, pos, seen = [], 0, set()
    body = text.rstrip()
    while pos < len(body):
        m = _DURATION_PART_RE.match(body, pos)
        if not m:
            raise bad
        unit = m[2].lower()
        factor = _DURATION_UNITS.get(unit, 1 if unit == "" else None)
        if factor is None or factor in seen:
            raise bad
        seen.add(factor)
        parts.append((Decimal(m[1]), unit, factor))
        pos = m.end()
    if not parts or (len(parts) > 1 and any(unit == "" for _, unit, _ in parts)):
        raise bad
    seconds = float(sum(number * factor for number, _, factor in parts))
    if not math.isfinite(seconds):   # hundreds of digits overflow a float
        raise ValueError(f"bad duration {text!r}: too long; expected {DURATION_FORMS}")
    return seconds


def format_bytes(n: int | float, binary: bool = True) -> str:
    """``1536`` → ``"1.5 KiB"``, ``512`` → ``"512 B"``; decimal units (``"1.5 KB"``) with ``binary=False``.

    Three significant digits at most, so it fits in a table column; the output parses back with :func:`parse_size`.
    """
    base, suffix = (1024, "iB") if binary else (1000, "B")
    sign, value = ("-" if n < 0 else ""), abs(float(n))
    if value < base:
        return f"{sign}{value:.0f} B"
    for prefix in "KMGTP":
        value /= base
        text = f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"
        if float(text) < base or prefix == "P":
            break
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{sign}{text} {prefix}{suffix}"


_FORMAT_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """``5400`` → ``"1h 30m"``, ``45`` → ``"45s"``, ``0.25`` → ``"0.25s"``, ``200000`` → ``"2d 8h"``.

    The two largest units, rounded to the smaller one, so it reads at a glance; parses back with
    :func:`parse_duration`.
    """
    if not math.isfinite(seconds):
        return "forever" if seconds > 0 else "?"
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{sign}{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    total = round(seconds)
    for (name, size), (small_name, small) in zip(_FORMAT_UNITS, _FORMAT_UNITS[1:]):
        rounded = round(total / small) * small
        if rounded >= size:
            major, minor = divmod(rounded, size)
            minor //= small
            return f"{sign}{major}{name}" + (f" {minor}{small_name}" if minor else "")
    return f"{sign}{total}s"
