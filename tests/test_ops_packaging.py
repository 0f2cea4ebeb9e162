"""Packaging: wheels for the core, the example and every plugin under plugins/; an installed wheel builds its BPF
object on first use with a clear line, and reports the one version defined in duet_core/__init__.py."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import duet_core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(REPO, "plugins", "*", "pyproject.toml")))
PACKAGES += [os.path.join(REPO, "examples", "duet-catalog")]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "tests", "docs", "var", "tmp")


def wheel(project: str, tmp_path) -> str:
    """``pip wheel`` of a copy of ``project`` (building must not write into the repository); the wheel's path."""
    copy = str(tmp_path / "src" / os.path.basename(project))
    shutil.copytree(project, copy, ignore=IGNORE)
    out = str(tmp_path / "wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", out, copy], check=True, capture_output=True,
                   timeout=300)
    (whl,) = glob.glob(os.path.join(out, "*.whl"))
    return whl


def test_core_wheel_installs_and_builds_its_bpf_object_on_first_use(tmp_path, bpf_required):
    whl = wheel(REPO, tmp_path)
    assert os.path.basename(whl) == f"duet-{duet_core.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"duet-{duet_core.__version__}.dist-info/entry_points.txt").decode()
    assert {"duet_core/bpf/pagecache.bpf.c", "duet_core/bpf/pagecache.h", "duet_core/testing.py"} <= names
    assert not [n for n in names if n.endswith(".o")]            # the object is built for the kernel it runs on
    assert "duet = duet_core.cli.main:main" in entry_points and "duet = duet_core.testing" in entry_points

    site = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, whl],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=site)
    env.pop("DUET_BPF_DIR", None)
    argv = [sys.executable, "-m", "duet_core.cli.main"]
    cwd = str(tmp_path)   # not the repository, whose duet_core would come first on sys.path
    where = subprocess.run([sys.executable, "-c", "import duet_core; print(duet_core.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=cwd)
    assert where.stdout.startswith(site)                         # the wheel's copy runs, not the repository's

    first = subprocess.run([*argv, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    built = os.path.join(site, "duet_core", "bpf", "build")
    assert first.stderr.splitlines() == [
        f"duet: building the BPF object for this kernel in {built} (once; clang and bpftool needed)"]
    assert first.returncode == 0 and json.loads(first.stdout)["bpf"] is True
    assert os.path.exists(os.path.join(built, "pagecache.bpf.o"))
    second = subprocess.run([*argv, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert second.returncode == 0 and second.stderr == ""

    version = subprocess.run([*argv, "--version"], env=env, capture_output=True, text=True, timeout=60, cwd=cwd)
    assert version.stdout == f"duet {duet_core.__version__}\n"


@pytest.mark.parametrize("project", PACKAGES, ids=[os.path.basename(p) for p in PACKAGES])
def test_plugin_wheels_build_and_carry_their_entry_point(tmp_path, project):
    whl = wheel(project, tmp_path)
    with zipfile.ZipFile(whl) as zf:
        (eps,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert "[duet.tasks]" in zf.read(eps).decode()


def test_built_in_plugins_carry_the_core_version():
    """One version for the whole project: duet_core/__init__.py defines it; each built-in plugin is its own
    distribution (a wheel must carry a version) and must carry the same one, so a release bumps them together."""
    import tomllib

    for project in PACKAGES:
        with open(os.path.join(project, "pyproject.toml"), "rb") as fh:
            meta = tomllib.load(fh)
        version = meta["project"]["version"]
        assert version == duet_core.__version__, f"{project}: version {version}, core {duet_core.__version__}"
        # ... and needs exactly that core: a plugin wheel is never installed beside another release's API.
        assert f"duet=={version}" in meta["project"]["dependencies"], project


def test_bump_version_sets_the_one_version_everywhere(tmp_path):
    """A release changes the version with one command; afterwards the core and every plugin carry it, and every
    plugin pins the core to it (what test_built_in_plugins_carry_the_core_version checks of the tree itself)."""
    import tomllib

    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=IGNORE)
    out = subprocess.run([sys.executable, str(copy / "scripts" / "bump-version"), "7.8.9"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 + len(PACKAGES)      # __init__.py and each plugin's pyproject
    assert '__version__ = "7.8.9"' in (copy / "duet_core" / "__init__.py").read_text()
    for project in PACKAGES:
        meta = tomllib.loads((copy / os.path.relpath(project, REPO) / "pyproject.toml").read_text())["project"]
        assert meta["version"] == "7.8.9" and "duet==7.8.9" in meta["dependencies"], project
    bad = subprocess.run([sys.executable, str(copy / "scripts" / "bump-version"), "seven"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("usage:")
