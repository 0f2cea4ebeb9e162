"""``duet plugins new``: the generated project installs with pip, is listed by ``duet plugins``, and passes its own
test — which is a real test: break the task and it fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
from plugin_dist import duet_argv

from duet_core import scaffold
from duet_core.hookspecs import API_VERSION


def duet(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(duet_argv(*args), capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def pip_install(project: str, site: str) -> None:
    """A real, non-editable ``pip install`` of the project into ``site`` (no network: duet is already here)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--upgrade", "--target", site, project],
                   check=True, capture_output=True, timeout=300)


def run_pytest(project: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", project,
                           os.path.join(project, "tests")], capture_output=True, text=True, cwd=project, env=env,
                          timeout=300)


@pytest.fixture
def scaffolded(tmp_path):
    """``duet plugins new`` run for real, and an environment where a pip-installed copy of it is found."""
    result = duet("plugins", "new", "hello-world", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    project = str(tmp_path / "duet-hello-world")
    assert result.stdout.startswith(f"created {project}\n")
    site = str(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=site)
    return project, site, env


def test_new_plugin_installs_lists_and_passes_its_own_test(scaffolded, require_root):
    project, site, env = scaffolded
    assert sorted(os.listdir(project)) == ["README.md", "duet_hello_world", "pyproject.toml", "tests"]
    pip_install(project, site)

    listed = json.loads(duet("plugins", "--json", env=env).stdout)
    task = next(t for t in listed["tasks"] if t["name"] == "hello-world")
    assert (task["package"], task["version"]) == ("duet-hello-world", "0.1.0")

    tested = run_pytest(project, env)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout


def test_an_editable_install_as_the_docs_say_is_listed_and_follows_the_source(tmp_path):
    """``pip install -e`` (what the scaffold's README and docs/plugins.md tell an author to run), in a fresh venv
    that sees duet's environment: ``duet plugins`` lists the task at once, and an edit of the source shows without
    reinstalling."""
    result = duet("plugins", "new", "edit-me", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    project = tmp_path / "duet-edit-me"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    duet_site = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "duet-env.pth"), "w") as fh:     # duet, pip and setuptools from duet's venv
        fh.write(duet_site + "\n")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                              "--no-build-isolation", "--no-index", "-e", str(project)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr

    def listed() -> dict:
        proc = subprocess.run([py, "-m", "duet_core.cli.main", "plugins", "--json"], capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert proc.returncode == 0, proc.stderr
        return next(t for t in json.loads(proc.stdout)["tasks"] if t["name"] == "edit-me")

    assert listed()["package"] == "duet-edit-me"
    module = project / "duet_edit_me" / "__init__.py"
    module.write_text(module.read_text().replace("hash every file with BLAKE3", "edited in place"))
    assert listed()["description"].startswith("edited in place")


def test_the_generated_test_fails_when_the_task_is_broken(scaffolded, require_root):
    project, site, env = scaffolded
    module = os.path.join(project, "duet_hello_world", "__init__.py")
    with open(module) as fh:
        source = fh.read()
    broken = source.replace('"hashed_bytes": ctx.file.size', '"hashed_bytes": 0')
    assert broken != source
    with open(module, "w") as fh:
        fh.write(broken)
    pip_install(project, site)

    tested = run_pytest(project, env)
    assert tested.returncode == 1, tested.stdout + tested.stderr
    assert "1 failed" in tested.stdout


def test_a_plugin_built_for_another_api_is_refused_with_one_line(scaffolded):
    project, site, env = scaffolded
    module = os.path.join(project, "duet_hello_world", "__init__.py")
    with open(module) as fh:
        source = fh.read()
    with open(module, "w") as fh:
        assert f"api_version={API_VERSION})" in source     # the scaffold writes the number, not the symbol
        fh.write(source.replace(f"api_version={API_VERSION})", "api_version=99)"))
    pip_install(project, site)

    listed = json.loads(duet("plugins", "--json", env=env).stdout)
    assert "hello-world" not in [t["name"] for t in listed["tasks"]]
    (broken,) = [b for b in listed["broken"] if b["name"] == "hello-world"]
    assert "built for duet plugin API 99, this duet has API 1" in broken["error"]

    run = duet("run", "hello-world", "--path", project, "--state-dir", os.path.join(site, "state"),
               "--config", os.devnull, env=env)
    assert run.returncode == 2
    *_notes, last = run.stderr.splitlines()   # a note that the plugin was skipped, then the error
    assert last.startswith("duet: error: task 'hello-world' is installed but broken")
    assert "built for duet plugin API 99" in last
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name", ["Upper", "1abc", "has space", "dot.ted", "../escape", "x" * 41])
def test_bad_names_are_refused_with_one_line(tmp_path, name):
    result = duet("plugins", "new", name, "--dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"duet: error: bad plugin name {name!r}")
    assert os.listdir(tmp_path) == []


def test_an_existing_project_is_never_overwritten(tmp_path):
    (tmp_path / "duet-mine").mkdir()
    (tmp_path / "duet-mine" / "keep").write_text("mine")
    result = duet("plugins", "new", "mine", "--dir", str(tmp_path))
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert os.listdir(tmp_path / "duet-mine") == ["keep"]


def test_generated_files_name_the_task_consistently():
    files = scaffold.plugin_files("img_thumbs")
    assert 'img_thumbs = "duet_img_thumbs:plugin"' in files["pyproject.toml"]
    assert 'name = "duet-img-thumbs"' in files["pyproject.toml"]
    assert 'TaskSpec("img_thumbs"' in files["duet_img_thumbs/__init__.py"]
    assert "def test_img_thumbs_processes_every_file" in files["tests/test_img_thumbs.py"]


def test_duet_fs_skips_without_root_unless_ci_requires_it(tmp_path):
    """A plugin author's test that needs a scratch filesystem skips for a user without root — and fails with
    DUET_REQUIRE_ROOT=1, so a CI job that lost its root does not pass green. (The pytest run is root's; a conftest
    makes geteuid() answer 1000, as for a user: namespaces and setpriv are not allowed everywhere CI runs.)"""
    (tmp_path / "conftest.py").write_text("import os\n\nos.geteuid = lambda: 1000\n")
    test = tmp_path / "test_needs_fs.py"
    test.write_text("def test_needs_fs(duet_fs):\n    assert duet_fs.root\n")

    def pytest_as_non_root(**env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", str(test)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, **env})

    skipped = pytest_as_non_root()
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert "duet_fs needs root" in skipped.stdout
    failed = pytest_as_non_root(DUET_REQUIRE_ROOT="1")
    assert failed.returncode == 1 and "DUET_REQUIRE_ROOT=1" in failed.stdout, failed.stdout
