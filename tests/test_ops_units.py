"""Running duet unattended: the systemd units and cron file ``duet install-units`` writes, checked by systemd's own
verifier, run for real under the unit's capability set and from the cron line; ``duet watch`` reload and stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import fsimage
import plugin_dist
import pytest
from plugin_dist import duet_argv, make_dataset, read_log
from test_run_cli import wait_for

from duet_core import systemd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUET = os.path.join(os.path.dirname(sys.executable), "duet")   # the venv's console script
TASKS = {"reader": "ReaderTask('reader')", "r2": "ReaderTask('r2')"}


def duet(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(duet_argv(*args), capture_output=True, text=True, timeout=120, env=env, **kw)


def verify(paths: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


# scripts/dev setup installs systemd-analyze; only a developer machine without it skips. CI (.ci/run, with
# DUET_REQUIRE_BPF=1) runs these tests whatever happens, so a set-up that lost it fails instead of passing green.
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and os.environ.get("DUET_REQUIRE_BPF") != "1",
    reason="systemd-analyze is not installed (scripts/dev setup installs it)")


def unit_caps(unit_text: str) -> list[str]:
    """CapabilityBoundingSet= of a unit as setpriv(1) capability names."""
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", unit_text, re.M)
    return [c.removeprefix("CAP_").lower() for c in line.split()]


def under_caps(caps: list[str], argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """``argv`` as the unit runs it: root with only ``caps`` in the bounding set, and no_new_privs."""
    return subprocess.run(["setpriv", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)]),
                           "--no-new-privs", *argv], capture_output=True, text=True, timeout=120, env=env)


# -- the files -------------------------------------------------------------------------------------------------------
def test_contrib_files_are_what_install_units_writes_by_default():
    for name, text in systemd.render().items():
        with open(os.path.join(REPO, "contrib", "systemd", name)) as fh:
            assert fh.read() == text, f"contrib/systemd/{name} is stale: regenerate it from duet_core.systemd"
    with open(os.path.join(REPO, "contrib", "cron", "duet")) as fh:
        assert fh.read() == systemd.render_cron()


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    out = duet("install-units", "--dir", str(tmp_path), "--duet", DUET, "--metrics-dir", "/var/lib/node exporter",
               "--on-calendar", "Mon..Fri *-*-* 03:15")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["duet-watch@.service", "duet.service", "duet.timer"]
    checked = verify([str(tmp_path / "duet.service"), str(tmp_path / "duet.timer"),
                      str(tmp_path / "duet-watch@srv-data.service")], cwd=str(tmp_path))
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    service = (tmp_path / "duet.service").read_text()
    assert (f'ExecStart={DUET} -v run --config /etc/duet/duet.toml --quiet --metrics-dir "/var/lib/node exporter"'
            in service)
    assert "IOSchedulingClass=idle" in service and "Nice=19" in service and "SuccessExitStatus=5" in service
    watch = (tmp_path / "duet-watch@.service").read_text()
    assert "watch --path %f" in watch and "ExecReload=/bin/kill -HUP $MAINPID" in watch


@needs_systemd_analyze
def test_the_verifier_does_catch_a_broken_unit(tmp_path):
    files = systemd.render(DUET, on_calendar="*-*-* 25:99")
    systemd.install(files, str(tmp_path))
    checked = verify([str(tmp_path / "duet.timer")], cwd=str(tmp_path))
    assert checked.returncode != 0 and "calendar" in checked.stderr


def test_install_keeps_an_edited_unit_unless_forced(tmp_path):
    assert duet("install-units", "--dir", str(tmp_path), "--duet", DUET).returncode == 0
    again = duet("install-units", "--dir", str(tmp_path), "--duet", DUET)   # same content: fine
    assert again.returncode == 0
    (tmp_path / "duet.timer").write_text("# mine\n")
    refused = duet("install-units", "--dir", str(tmp_path), "--duet", DUET, "--on-calendar", "daily")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [f"duet: error: {tmp_path / 'duet.timer'} exists and differs "
                                           "(--force replaces it; --print shows ours)"]
    assert (tmp_path / "duet.timer").read_text() == "# mine\n"
    forced = duet("install-units", "--dir", str(tmp_path), "--duet", DUET, "--on-calendar", "daily", "--force")
    assert forced.returncode == 0
    assert "OnCalendar=daily" in (tmp_path / "duet.timer").read_text()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--duet", "relative/duet"], "the duet executable must be an absolute path"),
    (["--config", "/etc/duet\n.toml"], "control characters cannot go into a unit file"),
    (["--cron", "--print", "--at", "25:00"], "bad --at '25:00'"),
    (["--cron", "--print", "--config", "/etc/100%.toml"], "% cannot go into a cron line"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    if "--duet" not in args:
        args = ["--duet", DUET, *args]
    out = duet("install-units", "--dir", str(tmp_path), *args)
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr
    assert os.listdir(tmp_path) == []


# -- running as the units run ----------------------------------------------------------------------------------------
@pytest.fixture
def installed(tmp_path):
    env = plugin_dist.install(tmp_path / "plugins", plugin_dist.tasks_dist(TASKS), log=str(tmp_path / "log"))
    env.pop("DUET_STATE_DIR", None)
    return env


def test_bpf_loads_with_the_units_capabilities_and_not_without(installed, bpf_required):
    caps = unit_caps(systemd.render()["duet.service"])
    assert {"bpf", "perfmon", "sys_admin"} <= set(caps)
    with_caps = under_caps(caps, duet_argv("doctor", "--json"), installed)
    assert with_caps.returncode == 0 and '"bpf":true' in with_caps.stdout, with_caps.stdout + with_caps.stderr
    without = [c for c in caps if c not in ("bpf", "perfmon", "sys_admin")]
    denied = under_caps(without, duet_argv("doctor", "--json"), installed)
    assert denied.returncode == 1 and '"bpf":false' in denied.stdout


def test_the_cron_line_and_the_units_capabilities_run_a_real_maintenance_run(installed, tmp_path, bpf_required):
    with fsimage.loop_fs("btrfs") as fs:
        scope, files = make_dataset(fs.mnt, n=6)
        os.chmod(scope, 0o700)
        for dirpath, _dirs, names in os.walk(scope):   # files root cannot read without CAP_DAC_OVERRIDE
            for name in names:
                os.chown(os.path.join(dirpath, name), 12345, 12345)
                os.chmod(os.path.join(dirpath, name), 0o400)
        config = tmp_path / "duet.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n\n[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n')

        cron = systemd.render_cron(DUET, str(config))
        (line,) = [x for x in cron.splitlines() if x and not x.startswith(("#", "SHELL=", "PATH="))]
        fields = line.split(None, 6)
        assert fields[:6] == ["30", "2", "*", "*", "*", "root"]
        command = fields[6].removesuffix(" 2>&1 | logger -t duet")   # syslog may not exist here; the run must
        caps = unit_caps(systemd.render()["duet.service"])
        proc = under_caps(caps, ["/bin/sh", "-c", command], installed)
        assert proc.returncode == 0, proc.stderr
        assert f"duet: run finished: scope={os.path.realpath(scope)} mode=run result=complete exit=0" in proc.stderr
        assert sorted(e.relpath for e in read_log(tmp_path / "log")) == sorted(files)


# -- duet watch as a service ---------------------------------------------------------------------------------------
def test_watch_reloads_its_config_on_sighup_and_stops_cleanly_on_sigterm(installed, tmp_path, bpf_required):
    log = tmp_path / "log"
    with fsimage.loop_fs("btrfs") as fs:
        scope, _files = make_dataset(fs.mnt, n=4, sizes=(64 << 10,))
        config = tmp_path / "duet.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\n[[scope]]\npath = "{scope}"\ntasks = ["reader"]\n')
        proc = subprocess.Popen(duet_argv("-v", "watch", "--path", scope, "--config", str(config), "--quiet"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=installed)
        try:
            with open(os.path.join(scope, "a/f00"), "rb") as fh:
                fh.read()
            wait_for(lambda: [e.task for e in read_log(log)] == ["reader"], 30, "reader to take the cached file",
                     proc)

            config.write_text(f'state_dir = "{tmp_path / "state"}"\n[[scope]]\npath = "{scope}"\ntasks = ["r2"]\n')
            proc.send_signal(signal.SIGHUP)
            with open(os.path.join(scope, "b/f01"), "rb") as fh:
                fh.read()
            wait_for(lambda: ("r2", "b/f01") in {(e.task, e.relpath) for e in read_log(log)}, 30,
                     "the reloaded config's task r2 to take the newly cached file", proc)
            assert proc.poll() is None

            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
            assert time.monotonic() - t0 < 1.0     # within a second, as a run
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 5, err
    assert "duet: SIGHUP: reloading the config and plugins" in err
    results = re.findall(r"run finished: \S+ mode=watch result=(\S+)", err)
    assert results == ["SIGHUP", "SIGTERM"], err


def test_watch_refuses_several_scopes_in_one_process(installed, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = tmp_path / "duet.toml"
    config.write_text(f'[[scope]]\npath = "{tmp_path / "a"}"\ntasks = ["reader"]\n'
                      f'[[scope]]\npath = "{tmp_path / "b"}"\ntasks = ["reader"]\n')
    out = duet("watch", "--config", str(config), "--state-dir", str(tmp_path / "state"), env=installed)
    assert out.returncode == 2
    assert out.stderr.startswith("duet: error: duet watch watches one scope, and 2 were given by the config")
    assert len(out.stderr.splitlines()) == 1


def test_the_units_run_the_duet_that_wrote_them(tmp_path):
    out = subprocess.run([DUET, "install-units", "--print"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH="/usr/bin:/bin"))   # not the PATH's duet: this one
    assert out.returncode == 0, out.stderr
    assert f"ExecStart={DUET} -v run " in out.stdout and f"ExecStart={DUET} -v watch " in out.stdout
    lost = duet("install-units", "--print", env=dict(os.environ, PATH="/usr/bin:/bin"), cwd=str(tmp_path))
    assert lost.returncode == 2 and "give it with --duet PATH" in lost.stderr
