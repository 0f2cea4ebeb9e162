"""Sizes, rates and durations: what parses to what, what is refused (with a message naming it), and round trips."""

from __future__ import annotations

import math

import pytest

from duet_core.units import format_bytes, format_duration, parse_duration, parse_rate, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("512", 512),
    ("512B", 512),
    ("512 b", 512),
    ("1K", KiB),
    ("1k", KiB),
    ("1KB", 1000),
    ("1kb", 1000),
    ("1KiB", KiB),
    ("1kib", KiB),
    ("4 KiB", 4 * KiB),
    ("50MB", 50_000_000),
    ("50mb", 50_000_000),
    ("50 MB", 50_000_000),
    ("50M", 50 * MiB),
    ("50MiB", 50 * MiB),
    ("2G", 2 * GiB),
    ("2GB", 2_000_000_000),
    ("2GiB", 2 * GiB),
    ("1T", TiB),
    ("1TB", 10**12),
    ("1TiB", TiB),
    ("1PB", 10**15),
    ("1.5G", 3 * GiB // 2),
    ("1.5GB", 1_500_000_000),
    ("0.5KiB", 512),
    (".5KiB", 512),
    ("1.1K", 1126),           # a fraction of a unit rounds down to whole bytes
    ("  7 MB  ", 7_000_000),
    ("10.0", 10),
    (4096, 4096),             # integers as TOML gives them
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "MB", "-1", "-1MB", "1.5", "0.5B", "5XB", "5 M B", "5MBs", "50MB/s", "1e3", "nan", "inf", "NaN",
    "Infinity", "0x10", "1,000", "1_000", "+5", "5..0K", "five", "5 KB extra",
    -1, 1.5, float("nan"), float("inf"), True, None, [1],
])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError) as err:
        parse_size(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(text) in msg                       # names the bad text
    assert "KiB" in msg and "MB" in msg            # and the forms accepted


def test_parse_size_says_negative():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-5MB")


@pytest.mark.parametrize("text, expected", [
    ("50MB/s", 50_000_000),
    ("50 MB/s", 50_000_000),
    ("50mb/S", 50_000_000),
    ("50M", 50 * MiB),
    ("50M/s", 50 * MiB),
    ("20MiB/s", 20 * MiB),
    ("1GB/s", 10**9),
    ("4096", 4096),
    ("4096/s", 4096),
    (1000, 1000),
    ("0", None),
    ("0/s", None),
    ("0MB/s", None),
    (0, None),
    ("unlimited", None),
    ("Unlimited", None),
    ("none", None),
    (" NONE ", None),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", [
    "", "fast", "50MB/h", "50MB/", "/s", "-5MB/s", "50MB/s/s", "infinite", "nan/s", "1.5/s", -5, True,
])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError) as err:
        parse_rate(text)
    msg = str(err.value)
    assert "\n" not in msg and repr(text) in msg and "unlimited" in msg and "50MB/s" in msg


@pytest.mark.parametrize("text, expected", [
    ("0", 0.0),
    ("90", 90.0),
    ("1.5", 1.5),
    ("45s", 45.0),
    ("45 sec", 45.0),
    ("10m", 600.0),
    ("10min", 600.0),
    ("10 MIN", 600.0),
    ("2h", 7200.0),
    ("2 hours", 7200.0),
    ("1.5h", 5400.0),
    ("30d", 30 * 86400.0),
    ("1w", 7 * 86400.0),
    ("2weeks", 14 * 86400.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    ("1d2h3m4s", 86400 + 7200 + 180 + 4.0),
    ("30m1h", 5400.0),        # order does not matter, repeats do
    ("  5m ", 300.0),
    (".5s", 0.5),
    (60, 60.0),
    (2.5, 2.5),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", "  ", "h", "-5", "-5s", "5x", "5 years", "1h30", "30 1h", "1h1h", "1m 2min", "1s 1", "1e3s", "nan", "inf",
    "5s-", "1h,30m", "1:30", "P1D", -1, float("nan"), float("inf"), True, None,
])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError) as err:
        parse_duration(text)
    msg = str(err.value)
    assert "\n" not in msg and repr(text) in msg and "1h30m" in msg


@pytest.mark.parametrize("n, binary, expected", [
    (0, True, "0 B"),
    (1, True, "1 B"),
    (1023, True, "1023 B"),
    (1024, True, "1 KiB"),
    (1536, True, "1.5 KiB"),
    (50 * MiB, True, "50 MiB"),
    (123 * MiB + MiB // 2, True, "124 MiB"),
    (MiB - 1, True, "1 MiB"),            # rounds up into the next unit rather than "1024 KiB"
    (3 * GiB // 2, True, "1.5 GiB"),
    (TiB, True, "1 TiB"),
    (1500, False, "1.5 KB"),
    (50_000_000, False, "50 MB"),
    (999, False, "999 B"),
    (-2048, True, "-2 KiB"),
])
def test_format_bytes(n, binary, expected):
    assert format_bytes(n, binary=binary) == expected


@pytest.mark.parametrize("n", [0, 1, 999, 1024, 1536, 50 * MiB, 7 * GiB + 12345, 3 * TiB])
def test_format_bytes_parses_back(n):
    assert math.isclose(parse_size(format_bytes(n)), n, rel_tol=0.01)


@pytest.mark.parametrize("seconds, expected", [
    (0, "0s"),
    (0.25, "0.25s"),
    (1.5, "1.5s"),
    (45, "45s"),
    (59.6, "1m"),
    (60, "1m"),
    (90, "1m 30s"),
    (5400, "1h 30m"),
    (7200, "2h"),
    (86400, "1d"),
    (200_000, "2d 8h"),
    (30 * 86400, "30d"),
    (math.inf, "forever"),
])
def test_format_duration(seconds, expected):
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("seconds", [0, 0.5, 7, 59, 61, 3599, 3601, 5400, 86399, 90061, 30 * 86400])
def test_format_duration_parses_back(seconds):
    # two units at most, so within one of the smaller unit (at most a 1/60 of the whole when above a minute)
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, rel_tol=1 / 48, abs_tol=0.01)
