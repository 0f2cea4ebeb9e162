"""The plugin contract documents itself (in the spirit of datasette's test_docs): every hook in
:mod:`duet_core.hookspecs` has a one-line summary, documents each argument and its return value, says whether it
stops at the first result exactly when it does, is described in docs/plugins.md and is exercised
by at least one test."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

import duet_core
from duet_core import hookspecs
from duet_core.tasks import TaskSpec

TESTS = pathlib.Path(__file__).parent
DOCS = TESTS.parent / "docs" / "plugins.md"
FIRSTRESULT_PHRASE = "Stops at the first non-None result"


def hooks() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None}


HOOKS = sorted(hooks())


def spec_opts(name: str) -> dict:
    return getattr(hooks()[name], f"{hookspecs.PROJECT}_spec")


def doc(name: str) -> str:
    return inspect.getdoc(hooks()[name]) or ""


def test_the_hooks_are_the_documented_set():
    assert HOOKS == sorted(["duet_task", "duet_check", "duet_plan", "duet_observe", "duet_device_pass", "duet_process",
                            "duet_finish"])
    assert all(name.startswith(hookspecs.PROJECT + "_") for name in HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_one_line_summary(name):
    text = doc(name)
    assert text, f"{name} has no docstring"
    lines = text.splitlines()
    assert lines[0].strip() and lines[0].rstrip().endswith("."), f"{name}: summary should be one sentence"
    assert len(lines) == 1 or not lines[1].strip(), f"{name}: the summary must be one line, then a blank line"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_documents_every_argument_and_nothing_else(name):
    params = list(inspect.signature(hooks()[name]).parameters)
    text = doc(name)
    for p in params:
        assert f":param {p}:" in text, f"{name}: no ':param {p}:'"
    documented = re.findall(r":param (\w+):", text)
    assert sorted(documented) == sorted(params), f"{name}: documents {documented}, takes {params}"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_documents_what_it_returns(name):
    assert ":returns:" in doc(name), f"{name}: no ':returns:'"


@pytest.mark.parametrize("name", HOOKS)
def test_firstresult_is_said_exactly_when_it_is_so(name):
    firstresult = bool(spec_opts(name).get("firstresult"))
    text = " ".join(doc(name).split())     # the phrase may be wrapped over two lines
    says = FIRSTRESULT_PHRASE in text or re.search(r"\bfirstresult\b", text) is not None
    assert says == firstresult, (f"{name}: firstresult={firstresult}, but the docstring "
                                 f"{'says' if says else 'does not say'} so")


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_in_the_module_s_order_of_calls(name):
    order = hookspecs.__doc__.split("Order of calls", 1)
    assert len(order) == 2, "the module docstring lost its 'Order of calls'"
    assert re.search(rf"^\s+{name}\b", order[1], re.M), f"{name} is missing from 'Order of calls'"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_described_in_the_plugin_docs(name):
    text = DOCS.read_text()
    assert re.search(rf"\b{name}\b", text), f"{name} is not mentioned in docs/plugins.md"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_exercised_by_a_test(name):
    users = [p.name for p in sorted(TESTS.glob("test_*.py"))
             if p.name != pathlib.Path(__file__).name and re.search(rf"\b{name}\b", p.read_text())]
    assert users, f"no test under tests/ uses {name}"


def test_what_a_plugin_author_imports_is_the_contract():
    assert duet_core.hookimpl is hookspecs.hookimpl
    assert duet_core.API_VERSION == hookspecs.API_VERSION
    assert TaskSpec("x", "y").api_version == 1      # left out: the first API, never the current one
    assert hookspecs.PROJECT == "duet"
    assert "API_VERSION" in hookspecs.__doc__ and "duet.tasks" in hookspecs.__doc__
