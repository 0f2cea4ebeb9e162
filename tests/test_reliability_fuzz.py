"""Property tests (hypothesis) of the parsers duet owns: config TOML, sizes / rates / durations, event names and
kernel page masks, path resolution beneath a scope on a real directory tree, file names stored in the state
database, and names printed in messages.

The properties: a parser returns a valid value or raises its one documented error (ConfigError / ValueError /
OSError), never anything else; what is formatted parses back; a path opened beneath a scope is always inside it.
Examples are derandomized (the same on every CI run) and few, to stay quick; ``DUET_FUZZ_EXAMPLES=N`` runs more.
"""

from __future__ import annotations

import math
import os
import sqlite3
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duet_core import units
from duet_core.bpf.loader import CHUNK_KEY, KERNEL_CHUNK_VAL, split_words
from duet_core.config import ConfigError, parse_config
from duet_core.engine import MAX_PAGE, mask_pages
from duet_core.errors import DuetError, printable
from duet_core.events import Event
from duet_core.identity import open_beneath
from duet_core.plugins import LoadedTask
from duet_core.scheduler import resolve_options
from duet_core.scope import open_regular
from duet_core.state import db_path, py_path
from duet_core.tasks import TaskOption, TaskSpec

EXAMPLES = int(os.environ.get("DUET_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- units -------------------------------------------------------------------------------------------------------------
UNIT_TEXT = st.text(alphabet=string.digits + ".-+eE kKmMgGtTpPiIbBsShHdDwW/unlimitedone_\t\n\x00", max_size=16)
LONG_NUMBERS = st.builds(lambda digits, unit: digits + unit, st.text(alphabet=string.digits + ".", min_size=20,
                                                                      max_size=500), st.sampled_from(["", "P", "w"]))


@FUZZ
@given(st.one_of(UNIT_TEXT, LONG_NUMBERS, st.text(max_size=12), st.integers(), st.floats(), st.booleans(),
                st.none()))
def test_unit_parsers_return_a_valid_value_or_raise_value_error(value):
    for parse in (units.parse_size, units.parse_rate, units.parse_duration):
        try:
            out = parse(value)
        except ValueError as exc:
            assert "\n" not in str(exc)
            continue
        if parse is units.parse_rate and out is None:
            continue
        assert isinstance(out, (int, float)) and not isinstance(out, bool)
        assert out >= 0 and math.isfinite(out)
        if parse is units.parse_size:
            assert isinstance(out, int)


def test_found_by_fuzzing_big_sizes_are_refused_not_rounded():
    """Regression: ``9999999999999169T`` came back rounded (Decimal's 28 digits), not as the exact product."""
    assert units.parse_size("8388607T") == 8388607 << 40
    assert units.parse_size(str((1 << 63) - 1)) == (1 << 63) - 1
    for text in ("9999999999999169T", "8192PiB", str(1 << 63), 1 << 64, 1e300):
        try:
            units.parse_size(text)
        except ValueError as exc:
            assert "larger than 8 EiB" in str(exc)
        else:
            raise AssertionError(f"{text!r} accepted")


def test_found_by_fuzzing_an_endless_duration_is_refused():
    """Regression: a 400-digit number of seconds parsed to inf."""
    for text in ("1" + "0" * 400, "1" + "0" * 400 + "w"):
        try:
            units.parse_duration(text)
        except ValueError as exc:
            assert "too long" in str(exc)
        else:
            raise AssertionError(f"{text!r} accepted")


@FUZZ
@given(st.integers(min_value=0, max_value=1 << 60),
       st.sampled_from(["", "B", "K", "KB", "KiB", "M", "MB", "MiB", "G", "GB", "GiB", "T", "TiB", "P", "PB"]),
       st.sampled_from(["", " "]))
def test_sizes_parse_exactly(n, unit, space):
    mult = {"": 1, "B": 1, "K": 1024, "KB": 1000, "KiB": 1024, "M": 1 << 20, "MB": 10**6, "MiB": 1 << 20,
            "G": 1 << 30, "GB": 10**9, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40, "P": 1 << 50, "PB": 10**15}
    for text in (f"{n}{space}{unit}", f"{n}{space}{unit.lower()}"):
        if n * mult[unit] > units.MAX_SIZE:
            try:
                units.parse_size(text)
            except ValueError:
                continue
            raise AssertionError(f"{text!r} accepted")
        assert units.parse_size(text) == n * mult[unit]


@FUZZ
@given(st.integers(min_value=0, max_value=1 << 55))
def test_formatted_sizes_parse_back_within_their_precision(n):
    back = units.parse_size(units.format_bytes(n))
    assert abs(back - n) <= max(1, n * 0.006), units.format_bytes(n)


@FUZZ
@given(st.floats(min_value=0, max_value=10**9, allow_nan=False))
def test_formatted_durations_parse_back_within_their_precision(seconds):
    back = units.parse_duration(units.format_duration(seconds))
    assert abs(back - seconds) <= max(0.006, seconds / 40 + 0.5), units.format_duration(seconds)


# -- the config --------------------------------------------------------------------------------------------------------
KEYS = st.sampled_from(["state_dir", "defaults", "scope", "task", "path", "tasks", "budget", "rate_limit",
                        "idle_io", "cache_hygiene", "one_file_system", "backup", "reader", "x", "budgt"])
SCALARS = st.one_of(st.text(max_size=12), st.sampled_from(["/srv", "/home/u", "relative", "1h", "50MB/s", "",
                                                           "/a/../b", "/x\x00y", "0"]),
                    st.integers(min_value=-(1 << 64), max_value=1 << 64), st.floats(), st.booleans())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def toml_value(v) -> str:
    """A minimal TOML writer (inline tables and arrays only) for generated documents."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in v
                             if not 0xD800 <= ord(c) <= 0xDFFF) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_any_config_document_is_a_config_or_one_config_error(doc):
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in doc.items())
    _check_config(text)


@FUZZ
@given(st.text(max_size=200))
def test_any_text_is_a_config_or_one_config_error(text):
    _check_config(text)


def _check_config(text: str) -> None:
    try:
        config = parse_config(text, source="fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")
        return
    assert os.path.isabs(config.state_dir)
    for scope in config.scopes:
        assert os.path.isabs(scope.path) and os.path.normpath(scope.path) == scope.path and "\0" not in scope.path
        assert scope.tasks and all(isinstance(t, str) and t.strip() for t in scope.tasks)
        assert scope.budget is None or scope.budget >= 0


OPTION_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(KEYS, SCALARS, max_size=2),
                          st.sampled_from(["50MB", "1h", "yes", "off", " 7 ", "-0", "1e3", "inf"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["s", "i", "f", "b", "z", "d", "p"]), OPTION_VALUES, max_size=7))
def test_task_option_values_are_typed_or_one_duet_error(given_values):
    """What a config's [task.NAME] table or -o gives a task is converted to the option's type, or refused."""
    spec = TaskSpec("typed", "all option types", options=tuple(
        TaskOption(n, t) for n, t in zip("sifbzdp", ("str", "int", "float", "bool", "size", "duration", "path"))))
    task = LoadedTask(spec, None, "fuzz", "0", "fuzz")
    try:
        out = resolve_options(task, given_values)
    except DuetError:
        return
    kinds = {"s": str, "i": int, "f": float, "b": bool, "z": int, "d": float, "p": str}
    for name, value in given_values.items():
        assert type(out[name]) is kinds[name], (name, value, out[name])
        if name in "fd":
            assert math.isfinite(out[name])
        if name in "zd":
            assert out[name] >= 0
        if name == "p":
            assert os.path.isabs(out[name])


# -- events ------------------------------------------------------------------------------------------------------------
@FUZZ
@given(st.text(max_size=40))
def test_event_names_parse_or_raise_value_error(text):
    try:
        ev = Event.parse(text)
    except ValueError:
        return
    assert isinstance(ev, Event)


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=(MAX_PAGE >> 6) + 4),
                          st.integers(min_value=0, max_value=(1 << 64) - 1)), max_size=20))
def test_kernel_page_masks_decode_to_exactly_their_set_bits(records):
    chunks = np.array([c for c, _ in records], dtype=np.uint64)
    masks = np.array([m for _, m in records], dtype=np.uint64)
    want = sorted({c * 64 + b for c, m in records for b in range(64) if m >> b & 1 and c * 64 + b <= MAX_PAGE})
    assert list(mask_pages(chunks, masks)) == want


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.integers(min_value=0, max_value=3000),
                                    st.integers(min_value=(MAX_PAGE >> 6) - 1100, max_value=(MAX_PAGE >> 6) + 4)),
                          st.one_of(st.just((1 << 64) - 1), st.integers(min_value=0, max_value=(1 << 64) - 1))),
                min_size=64, max_size=400))
def test_many_words_decode_through_roaring_containers_to_exactly_their_set_bits(records):
    """64 words or more: the bitmap is written in roaring's own format (a bitset container where more than 4,096
    pages of 65,536 are set, an array elsewhere), from words in any order, repeated or not."""
    chunks = np.array([c for c, _ in records], dtype=np.uint64)
    masks = np.array([m for _, m in records], dtype=np.uint64)
    want = sorted({c * 64 + b for c, m in records for b in range(64) if m >> b & 1 and c * 64 + b <= MAX_PAGE})
    assert list(mask_pages(chunks, masks)) == want


WORD_BITS = st.one_of(st.just(0), st.just((1 << 64) - 1), st.integers(min_value=0, max_value=(1 << 64) - 1))


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=(MAX_PAGE >> 9) + 1),
                          st.lists(st.tuples(WORD_BITS, WORD_BITS, WORD_BITS), min_size=8, max_size=8),
                          st.integers(min_value=0, max_value=1 << 62)),
                unique_by=lambda r: r[0], max_size=12))
def test_kernel_chunks_split_into_words_keep_every_page_and_its_chunks_dirty_time(records):
    """The kernel merges 512-page chunks of eight words; user space splits them into one record per word with
    events. Every added, removed and dirtied page must come out the same, with its chunk's dirtying time."""
    keys = np.zeros(len(records), CHUNK_KEY)
    vals = np.zeros(len(records), KERNEL_CHUNK_VAL)
    want: dict[str, set] = {"added": set(), "removed": set(), "dirtied": set()}
    want_ns = {}
    for i, (chunk, words, ns) in enumerate(records):
        keys[i]["chunk"], keys[i]["ino"] = chunk, 257
        vals[i]["last_dirty_ns"] = ns
        for w, bits in enumerate(words):
            for name, b in zip(("added", "removed", "dirtied"), bits):
                vals[i]["w"][w][name] = b
                page0 = chunk * 512 + w * 64
                want[name] |= {page0 + k for k in range(64) if b >> k & 1 and page0 + k <= MAX_PAGE}
                if any(bits):
                    want_ns[chunk * 8 + w] = ns
    out_k, out_v = split_words(keys, vals)
    for name, pages in want.items():
        assert set(mask_pages(out_k["chunk"], out_v[name])) == pages
    assert dict(zip(out_k["chunk"].tolist(), out_v["last_dirty_ns"].tolist())) == want_ns
    assert (out_k["ino"] == 257).all()


# -- paths beneath a scope ---------------------------------------------------------------------------------------------
COMPONENTS = st.sampled_from(["..", ".", "", "in", "sub", "up", "abs", "loop", "fifo", "dev", "in/file",
                              "/", "//", "nowhere", "\udcff"])


def _tree(base: str) -> str:
    """root/ with a subdir, a file, and every kind of trap: symlinks up, absolute and looping, a fifo, a device."""
    root = os.path.join(base, "root")
    if os.path.exists(root):
        return root
    os.makedirs(os.path.join(root, "sub", "in"))
    os.makedirs(os.path.join(base, "outside"))
    for path in (os.path.join(root, "in"), os.path.join(root, "sub", "in")):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "file"), "w") as fh:
            fh.write("inside\n")
    with open(os.path.join(base, "outside", "file"), "w") as fh:
        fh.write("outside\n")
    os.symlink("../outside", os.path.join(root, "up"))
    os.symlink(os.path.join(base, "outside"), os.path.join(root, "abs"))
    os.symlink("loop", os.path.join(root, "loop"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.symlink("/dev/zero", os.path.join(root, "dev"))
    return root


@FUZZ
@given(st.lists(COMPONENTS, min_size=1, max_size=6))
def test_a_path_opened_beneath_the_scope_is_always_inside_it(tmp_path_factory, parts):
    base = str(tmp_path_factory.getbasetemp() / "fuzz-paths")
    root = _tree(base)
    rel = "/".join(parts)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for opener in (lambda: open_beneath(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK),
                       lambda: open_regular(root_fd, rel)):
            try:
                fd = opener()
            except OSError:
                continue
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
                assert where == root or where.startswith(root + "/"), (rel, where)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


# -- names in the state database and in messages -----------------------------------------------------------------------
NAMES = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"").replace(b"/", b"") or b"x")


@FUZZ
@given(st.lists(NAMES, min_size=1, max_size=4))
def test_any_file_name_survives_the_state_database(names):
    rel = os.fsdecode(b"/".join(names))
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE files (relpath TEXT NOT NULL)")
    db.execute("INSERT INTO files VALUES (?)", (db_path(rel),))
    (stored,) = db.execute("SELECT relpath FROM files").fetchone()
    assert py_path(stored) == rel and os.fsencode(py_path(stored)) == b"/".join(names)


@FUZZ
@given(st.one_of(st.text(max_size=40), NAMES.map(os.fsdecode)))
def test_printed_names_are_one_printable_line(text):
    out = printable(text)
    assert out.isprintable() and "\n" not in out
    if text.isprintable():
        assert out == text
    out.encode("utf-8")   # never a surrogate: printable on any terminal
