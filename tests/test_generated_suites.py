"""Generated projects pass their own test suites, on the real services they chose.

A covering set of answer combinations (every pair of option values at least
once, plus all-on and all-off for each database; tests/combinations.py) is
rendered with the real cookiecutter; each project gets its own virtualenv from
its own requirements-dev.txt on the Python version it declares, a fresh
database on the real PostgreSQL or MariaDB server, and runs `make test` (its
README's command) once. tests/suites.py judges that single run: any failure,
error or skip fails, and so does a passed count below the collected count.
The suites run in background lanes from the start of the session; each test
here waits for its suite.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.combinations import TEMPLATE, cookiecutter_json, generated_suites, matrix_questions
from tests.conftest import fail_or_skip
from tests.suites import Suite, build_venv, declared_python, find_python
from tests.test_answers import HOSTILE


def suites() -> list[Suite]:
    """The covering set; the all-on SQLite project also carries the hostile free-text answers."""
    chosen = []
    for answers in generated_suites():
        all_on_sqlite = answers["database"] == "sqlite" and all(
            value for key, value in answers.items() if isinstance(value, bool) and key != "use_kubernetes"
        )
        if all_on_sqlite:
            chosen.append(Suite({**answers, **HOSTILE}, name="hostile-answers-" + Suite(answers).name))
        else:
            chosen.append(Suite(answers))
    return chosen


SUITES = suites()


@pytest.mark.parametrize("suite", SUITES, ids=[suite.name for suite in SUITES])
def test_generated_suite_passes(suite, lanes):
    """The project's own `make test` passes on its first and only run, every collected test passing."""
    outcome = lanes.result(suite)
    if outcome.unavailable:
        fail_or_skip(outcome.unavailable)
    assert outcome.error is None, outcome.error
    assert outcome.passed == outcome.collected > 0


def missing_pairs(accepted: list[dict], suites: list[dict]) -> set:
    """Pairs of (question, value) that some accepted combination has and no suite runs."""
    questions = list(matrix_questions())

    def pairs(answers: dict) -> set:
        return {((a, answers[a]), (b, answers[b])) for a, b in itertools.combinations(questions, 2)}

    return set().union(*(pairs(answers) for answers in accepted)) - set().union(*(pairs(answers) for answers in suites))


def test_every_pair_of_answers_meets_in_a_generated_suite(matrix):
    """Each pair of values two questions can take together (in some accepted, rendered project) is in a suite.

    The needed pairs come from what the matrix rendered, not from the covering-set code.
    """
    accepted = [project.answers for project in matrix.projects]
    assert sorted(missing_pairs(accepted, [suite.answers for suite in SUITES]), key=str) == []


def test_every_python_version_runs_a_suite():
    """Each Python version a project can declare is the one some generated suite runs on."""
    offered = set(cookiecutter_json()["python_version"])
    assert {suite.answers["python_version"] for suite in SUITES} == offered


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_commands_generate_a_service_that_serves_health(tmp_path):
    """The README's `make generate` (no input) then the generated README's `make run` serves /health."""
    template_venv = Path(sys.prefix)
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", str(template_venv / "bin" / ".installed"), "generate",
         f"VENV={template_venv}", "ARGS=--no-input", f"OUT={tmp_path}"],
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "make run" in result.stdout
    project = next(path for path in tmp_path.iterdir() if path.is_dir())
    assert "make run" in (project / "README.md").read_text()
    try:
        build_venv(project, find_python(declared_python(project)))
    except Exception as error:  # Unavailable or a failed install: either stops the test here
        fail_or_skip(f"cannot build the project's venv: {error}")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TEST_", "DATABASE_URL", "VIRTUAL_ENV"))}
    server = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"SERVICE_PORT={port}"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "make run did not serve /health within 60 s"
                time.sleep(0.5)
        assert '"status":"healthy"' in body.replace(" ", "")
        assert (project / "data").is_dir(), "make run should have created the local SQLite database"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
