"""Fixtures and run-wide plumbing for the template's own tests.

- `matrix`: every accepted combination rendered once, in this process
  (tests/rendering.py, tests/matrix.py); every matrix and deployment-file
  check reads it.
- The generated projects' own suites start in background lanes as soon as
  collection ends (tests/suites.py); their tests in
  tests/test_generated_suites.py wait for their results and run last, so
  every other test runs beside the lanes.
- With CI set, a skipped test is a failed test: in CI every service and tool
  must be there.
- The run ends with a summary: combinations rendered, distinct files checked,
  each generated suite and its times, the slowest tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import ci_report
from tests.combinations import (
    TEMPLATE,
    all_combinations,
    cookiecutter_json,
    defaults,
    feature_table,
    product_of_answers,
)

#: CI sets this: a test whose real service or tool is missing fails instead of skipping.
IN_CI = bool(os.environ.get("CI"))
LANES_KEY = pytest.StashKey()

#: Answers beyond the matrix, rendered and checked with it: a slug YAML 1.1 reads as
#: a boolean, another port, and the other Python versions (the matrix keeps the first).
EDGE_ANSWERS = [
    {**defaults(), "use_kubernetes": True, "service_name": "On", "service_port": "8443"},
    # A resource whose class sorts after the shared schemas: imports stay in ruff's order.
    {**defaults(), "resource_name": "warehouse_line_item", "resource_plural": "warehouse_line_items"},
    *({**defaults(), "python_version": version} for version in cookiecutter_json()["python_version"][1:]),
]


def fail_or_skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so a missing dependency is an error)")
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip is a failure: nothing may quietly not run there."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which counts as a failure: {reason}"


def suite_of(item):
    """The generated suite a test waits for, or None."""
    from tests.suites import Suite

    suite = item.callspec.params.get("suite") if getattr(item, "callspec", None) is not None else None
    return suite if isinstance(suite, Suite) else None


def pytest_collection_modifyitems(items):
    """The tests that wait for a generated suite run last.

    Until then the main thread runs every other test (the matrix, the updates,
    the typed client, ...) beside the suites' lanes, so both cores stay busy;
    waiting for the suites first would leave those tests one core at the end.
    """
    items[:] = [item for item in items if suite_of(item) is None] + [item for item in items if suite_of(item)]


def pytest_collection_finish(session):
    """Start the generated suites of the selected tests, in background lanes."""
    if session.config.option.collectonly:
        return
    from tests.suites import Lanes

    suites = [suite for suite in map(suite_of, session.items) if suite is not None]
    if suites:
        session.config.stash[LANES_KEY] = Lanes(suites)
        ci_report.REPORT.lanes = session.config.stash[LANES_KEY]


def pytest_sessionfinish(session):
    lanes = session.config.stash.get(LANES_KEY, None)
    if lanes is not None:
        lanes.shutdown()


@pytest.fixture(scope="session")
def lanes(request):
    lanes = request.config.stash.get(LANES_KEY, None)
    assert lanes is not None, "the generated suites were not started (collection hook)"
    return lanes


@pytest.fixture(scope="session")
def table():
    """The post-generation hook's feature table."""
    return feature_table()


@pytest.fixture(scope="session")
def matrix():
    """Every accepted combination and the edge answers, rendered once; the refused ones recorded."""
    from tests.matrix import render_matrix

    started = time.perf_counter()
    accepted = all_combinations()
    refused = [answers for answers in product_of_answers() if answers not in accepted]
    built = render_matrix(accepted + refused + EDGE_ANSWERS)
    ci_report.REPORT.add_step("render every combination (in process)", time.perf_counter() - started)
    ci_report.REPORT.matrix = built
    ci_report.REPORT.edge_answers = len(EDGE_ANSWERS)
    return built


class Baked:
    """A project rendered by pytest-cookies (the real cookiecutter) and the answers that made it."""

    def __init__(self, path: Path, context: dict):
        self.path = path
        self.context = context


def bake_or_fail(cookies, answers: dict) -> Baked:
    """Render with pytest-cookies' `cookies` fixture; fail the test if cookiecutter does."""
    result = cookies.bake(extra_context=answers, template=str(TEMPLATE))
    assert result.exit_code == 0, f"rendering {answers} failed: {result.exception!r}"
    assert result.exception is None
    return Baked(Path(result.project_path), dict(result.context))


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call", "teardown"):
        ci_report.REPORT.durations.append((report.duration, report.when, report.nodeid))


def pytest_sessionstart(session):
    ci_report.REPORT.started = time.perf_counter()


def pytest_terminal_summary(terminalreporter):
    for line in ci_report.REPORT.lines(time.perf_counter() - ci_report.REPORT.started):
        terminalreporter.write_line(line)
