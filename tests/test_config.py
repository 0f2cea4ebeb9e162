"""The config file: a full valid file loads as documented; every kind of mistake is one ConfigError line naming it."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest

from duet_core import config as config_mod
from duet_core.config import Config, ConfigError, Defaults, ScopeConfig, load_config, parse_config
from duet_core.errors import DuetError

FULL = """\
state_dir = "/srv/duet-state"

[defaults]
rate_limit = "50MB/s"
budget = "2h"
idle_io = false
cache_hygiene = true
one_file_system = true

[[scope]]
path = "/home"
tasks = ["backup", "scrub"]
one_file_system = false
budget = "1h"
rate_limit = "20MiB/s"

[[scope]]
path = "/srv/data/"
tasks = ["scrub"]

[[scope]]
path = "/var/lib/db"
tasks = ["gc"]
budget = "none"
rate_limit = "unlimited"

[task.backup]
target = "/mnt/backup"
exclude = ["*.tmp", "cache/"]
keep = 7
verify = true

[task.scrub]
every = "30d"
"""


def write(tmp_path, text: str, name: str = "duet.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_full_file_loads(tmp_path):
    path = write(tmp_path, FULL)
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.state_dir == "/srv/duet-state"
    assert cfg.defaults == Defaults(rate_limit=50_000_000, budget=7200.0, idle_io=False, cache_hygiene=True,
                                    one_file_system=True)
    home, srv, db = cfg.scopes
    assert home == ScopeConfig(path="/home", tasks=("backup", "scrub"), one_file_system=False, budget=3600.0,
                               rate_limit=20 << 20)
    # unset keys take [defaults]; the path is normalised
    assert srv == ScopeConfig(path="/srv/data", tasks=("scrub",), one_file_system=True, budget=7200.0,
                              rate_limit=50_000_000)
    # "none"/"unlimited" override a default limit
    assert db.budget is None and db.rate_limit is None
    assert cfg.task_options == {"backup": {"target": "/mnt/backup", "exclude": ["*.tmp", "cache/"], "keep": 7,
                                           "verify": True},
                                "scrub": {"every": "30d"}}
    assert cfg.options_for("scrub") == {"every": "30d"}
    assert cfg.options_for("defrag") == {}


def test_results_are_frozen(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.state_dir = "/tmp"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scopes[0].budget = 1.0  # type: ignore[misc]
    cfg.options_for("backup")["exclude"].append("x")  # a copy: the task may keep and change it
    assert cfg.task_options["backup"]["exclude"] == ["*.tmp", "cache/"]


def test_minimal_and_empty(tmp_path):
    assert load_config(write(tmp_path, "")) == Config(source=str(tmp_path / "duet.toml"))
    cfg = parse_config('[[scope]]\npath = "/x"\ntasks = ["scrub"]\n')
    assert cfg.state_dir == "/var/lib/duet"
    assert cfg.defaults == Defaults()
    assert cfg.scopes == (ScopeConfig(path="/x", tasks=("scrub",)),)
    assert cfg.defaults.rate_limit is None and cfg.defaults.budget is None
    assert cfg.defaults.idle_io and cfg.defaults.cache_hygiene and not cfg.defaults.one_file_system


def test_numbers_for_rate_and_budget():
    cfg = parse_config("[defaults]\nrate_limit = 1048576\nbudget = 90\n")
    assert cfg.defaults.rate_limit == 1 << 20 and cfg.defaults.budget == 90.0
    assert parse_config("[defaults]\nrate_limit = 0\n").defaults.rate_limit is None


def test_missing_default_file_is_empty_config(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "nope" / "duet.toml"))
    assert load_config() == Config()
    assert load_config(None).scopes == ()


def test_default_file_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", write(tmp_path, FULL))
    assert len(load_config().scopes) == 3


def test_missing_explicit_file_is_an_error(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"config file {path} does not exist"):
        load_config(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'state_dir = "/caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"{bad}: not UTF-8"):
        load_config(bad)


def test_config_error_is_a_duet_error_with_exit_code_2():
    assert issubclass(ConfigError, DuetError)
    assert ConfigError.exit_code == 2


def test_scope_for(tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    os.symlink(home, tmp_path / "link")
    cfg = parse_config(f'[[scope]]\npath = "{home}"\ntasks = ["scrub"]\n'
                       f'[[scope]]\npath = "{tmp_path / "link" / "sub"}"\ntasks = ["backup"]\n')
    assert cfg.scope_for(home) is cfg.scopes[0]
    assert cfg.scope_for(f"{home}/") is cfg.scopes[0]
    assert cfg.scope_for(tmp_path / "link") is cfg.scopes[0]          # the argument is resolved ...
    assert cfg.scope_for(home / "sub") is cfg.scopes[1]               # ... and so is the configured path
    assert cfg.scope_for(f"{home}/sub/../sub") is cfg.scopes[1]
    assert cfg.scope_for(tmp_path) is None                            # the scope's own path only, not a parent
    assert cfg.scope_for(home / "sub" / "deeper") is None             # nor a child


def test_toml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, '[defaults]\nbudget = "2h"\nrate_limit = 50MB/s\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in msg and "column" in msg


BAD = [
    # (file text, key path in the message, more text the message must hold)
    ("stat_dir = '/x'", "stat_dir", "did you mean 'state_dir'?"),
    ("colour = 1", "colour", "valid keys: state_dir, defaults, scope, task, metrics_dir"),
    ("[defaults]\nbuget = '1h'", "defaults.buget", "did you mean 'budget'?"),
    ("[defaults]\nidle = true", "defaults.idle", "did you mean 'idle_io'?"),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\nbudgt = '1h'", "scope[0].budgt", "did you mean 'budget'?"),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\n[[scope]]\npath = '/b'\ntask = ['x']", "scope[1].task",
     "did you mean 'tasks'?"),
    ("[tasks.backup]\nx = 1", "tasks", "did you mean 'task'?"),
    # wrong types
    ("state_dir = 5", "state_dir", "expected an absolute path, got integer 5"),
    ("metrics_dir = 'prom'", "metrics_dir", 'expected an absolute path, got "prom"'),
    ("defaults = 5", "defaults", "expected a table"),
    ("[defaults]\nidle_io = 'yes'", "defaults.idle_io", 'expected true or false, got string "yes"'),
    ("[defaults]\ncache_hygiene = 1", "defaults.cache_hygiene", "expected true or false, got integer 1"),
    ("[defaults]\none_file_system = 'false'", "defaults.one_file_system", "expected true or false"),
    ("[defaults]\nrate_limit = true", "defaults.rate_limit", "got boolean true"),
    ("[defaults]\nrate_limit = ['1M']", "defaults.rate_limit", "got array"),
    ("[defaults]\nbudget = false", "defaults.budget", "got boolean false"),
    ("[defaults]\nbudget = 1979-05-27", "defaults.budget", "got date"),
    ("[scope]\npath = '/a'\ntasks = ['x']", "scope", "write [[scope]], not [scope]"),
    ("scope = 3", "scope", "expected an array of tables"),
    ("scope = [1]", "scope[0]", "expected a table"),
    ("[[scope]]\npath = 7\ntasks = ['x']", "scope[0].path", "expected an absolute path, got integer 7"),
    ("[[scope]]\npath = '/a'\ntasks = 'backup'", "scope[0].tasks", 'got string "backup"'),
    ("[[scope]]\npath = '/a'\ntasks = ['x', 3]", "scope[0].tasks[1]", "expected a task name"),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\none_file_system = 'no'", "scope[0].one_file_system",
     "expected true or false"),
    ("task = 1", "task", "expected tables of task options"),
    ("[task]\nbackup = 'fast'", "task.backup", "expected a table of options ([task.backup])"),
    ("[task.backup.retention]\ndaily = 7", "task.backup.retention", "no nested tables"),
    ("[task.backup]\nx = [1, {a = 1}]", "task.backup.x[1]", "got table"),
    ('[task."my task"]\nx = {a = 1}', 'task."my task".x', "got table"),
    # bad units
    ("[defaults]\nrate_limit = '50 MB per second'", "defaults.rate_limit", "bad rate '50 MB per second'"),
    ("[defaults]\nrate_limit = -5", "defaults.rate_limit", "bad rate -5"),
    ("[defaults]\nbudget = '2 hrs and a bit'", "defaults.budget", "bad duration '2 hrs and a bit'"),
    ("[defaults]\nbudget = '-1h'", "defaults.budget", "negative"),
    ("[defaults]\nbudget = nan", "defaults.budget", "bad duration nan"),
    ("[defaults]\nbudget = inf", "defaults.budget", "bad duration inf"),
    ("[defaults]\nbudget = '0s'", "defaults.budget", 'use "none" for no budget'),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\n[[scope]]\npath = '/b'\ntasks = ['x']\nbudget = '2x'",
     "scope[1].budget", "bad duration '2x'"),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\nrate_limit = '5MB/min'", "scope[0].rate_limit", "bad rate '5MB/min'"),
    # paths
    ("state_dir = 'var/lib/duet'", "state_dir", 'expected an absolute path, got "var/lib/duet"'),
    ("[[scope]]\npath = 'home'\ntasks = ['x']", "scope[0].path", 'expected an absolute path, got "home"'),
    ("[[scope]]\npath = '~/data'\ntasks = ['x']", "scope[0].path", "absolute"),
    ("[[scope]]\npath = ''\ntasks = ['x']", "scope[0].path", "absolute"),
    ("[[scope]]\npath = '/a'\ntasks = ['x']\n[[scope]]\npath = '/b'\ntasks = ['x']\n[[scope]]\npath = '/a/./'\n"
     "tasks = ['y']", "scope[2].path", "/a is already scope[0]"),
    # scope contents
    ("[[scope]]\ntasks = ['x']", "scope[0].path", "missing"),
    ("[[scope]]\npath = '/a'", "scope[0].tasks", "missing"),
    ("[[scope]]\npath = '/a'\ntasks = []", "scope[0].tasks", "at least one task"),
    ("[[scope]]\npath = '/a'\ntasks = ['']", "scope[0].tasks[0]", "empty task name"),
    ("[[scope]]\npath = '/a'\ntasks = ['scrub', 'scrub']", "scope[0].tasks[1]", "'scrub' is listed twice"),
]


@pytest.mark.parametrize("text, key, detail", BAD)
def test_errors_name_file_and_key(tmp_path, text, key, detail):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}: "), msg
    assert detail in msg, msg
