"""The example plugins in examples/ are built, installed with pip and pass their own tests, as CI runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from plugin_dist import duet_argv

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("example, task", [("duet-catalog", "catalog")])
def test_example_installs_is_listed_and_passes_its_tests(tmp_path, require_root, example, task):
    project = str(tmp_path / example)   # a copy: building must not leave build/ or *.egg-info in the repository
    shutil.copytree(os.path.join(EXAMPLES, example), project,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", site, project],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=site)

    listed = subprocess.run(duet_argv("plugins", "--json"), capture_output=True, text=True, env=env, timeout=60)
    assert task in [t["name"] for t in json.loads(listed.stdout)["tasks"]], listed.stdout + listed.stderr

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", project,
                             os.path.join(project, "tests")], capture_output=True, text=True, cwd=project, env=env,
                            timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert " passed" in tested.stdout and "skipped" not in tested.stdout, tested.stdout
