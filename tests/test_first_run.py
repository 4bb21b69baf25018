"""A first run without surprises: a refused answer costs one answer, the summary says what was made,
and the generated Makefile names a Python older than the project's.

Each test runs the real commands in a subprocess (cookiecutter, make) with
HOME in a temporary folder, so cookiecutter's replay file is the test's own.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.combinations import TEMPLATE, cookiecutter_json, defaults, feature_table
from tests.conftest import bake_or_fail

COOKIECUTTER = Path(sys.executable).parent / "cookiecutter"
#: A free-text answer with quotes, braces and non-ASCII, as typed at the prompt.
TYPED_NAME = 'Zoë\'s "Shop" {{ x }}'
RAW = "{% raw %}" + TYPED_NAME + "{% endraw %}"  # the same answer given as KEY=VALUE


def run(command: list[str], cwd: Path, home: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PWD": str(cwd)}
    return subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=120)


def prompt_answers(answers: dict) -> str:
    """What to type at cookiecutter's prompts: `answers` where given, Enter (the default) elsewhere."""
    keys = [key for key in cookiecutter_json() if not key.startswith("_")]
    return "".join(f"{answers.get(key, '')}\n" for key in keys)


def rerun_command(output: str) -> list[str]:
    """The command printed under the ERROR line, as arguments."""
    lines = output.splitlines()
    error = next(index for index, line in enumerate(lines) if line.startswith("ERROR"))
    assert lines[error + 1].startswith("Ask again"), output
    return shlex.split(lines[error + 2])


def replayed_answers(home: Path) -> dict:
    """The answers of the last generation, from cookiecutter's replay file."""
    (replay,) = (home / ".cookiecutter_replay").glob("*.json")
    return json.loads(replay.read_text(encoding="utf-8"))["cookiecutter"]


def assert_one_error_and_no_traceback(result: subprocess.CompletedProcess, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output, output
    assert "FailedHookException" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, output
    assert message in errors[0]


def test_a_refused_answer_prints_one_error_and_the_command_keeping_the_others(tmp_path):
    """cookiecutter: one ERROR line, no traceback, and a command that asks again with every other answer kept."""
    out = tmp_path / "out"
    answers = {"service_name": RAW, "database": "sqlite", "use_tracing": "no", "python_version": "3.13"}
    first = run(
        [str(COOKIECUTTER), "--no-input", "--output-dir", str(out), str(TEMPLATE), "resource_name=class"]
        + [f"{key}={value}" for key, value in answers.items()],
        cwd=tmp_path,
        home=tmp_path,
    )
    assert_one_error_and_no_traceback(first, "resource_name = 'class': must not be a Python keyword")
    assert [path for path in tmp_path.rglob("*") if path.is_file() and ".cookiecutter" not in str(path)] == []
    before = replayed_answers(tmp_path)

    command = rerun_command(first.stdout + first.stderr)
    assert command[:4] == [str(COOKIECUTTER), "--output-dir", str(out), str(TEMPLATE)]
    kept = dict(argument.split("=", 1) for argument in command[4:])
    # The refused answer is asked afresh, and what the template derives (the
    # slug from the name, the plural from the resource) is derived again.
    assert kept == answers

    # Asked again: Enter keeps every other answer, only the refused one is typed anew.
    second = run(command, cwd=tmp_path, home=tmp_path, stdin=prompt_answers({"resource_name": "klass"}))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = replayed_answers(tmp_path)
    changed = {key for key in cookiecutter_json() if not key.startswith("_") and after[key] != before[key]}
    assert changed == {"resource_name", "resource_plural"}
    assert (after["resource_name"], after["resource_plural"]) == ("klass", "klasses")
    assert after["service_name"] == TYPED_NAME
    assert (out / before["service_slug"] / "app" / "models.py").is_file()


def test_make_generate_refused_answer_is_one_error_and_a_command(tmp_path):
    """`make generate` in a terminal: a refused answer after the questions gives the same short output."""
    make = shutil.which("make")
    venv = Path(sys.prefix)
    result = run(
        [make, "--no-print-directory", "-o", str(venv / "bin" / ".installed"), "generate", f"VENV={venv}", f"OUT={tmp_path}"],
        cwd=TEMPLATE,
        home=tmp_path,
        stdin=prompt_answers({"service_port": "9090", "database": "3", "use_circuit_breaker": "n"}),
    )
    assert_one_error_and_no_traceback(
        result, "service_port = '9090': is already published by the prometheus service of the metrics feature"
    )
    command = rerun_command(result.stdout + result.stderr)
    assert command == [str(venv / "bin" / "cookiecutter"), "--output-dir", str(tmp_path), str(TEMPLATE), "database=sqlite", "use_circuit_breaker=no"]
    again = run(command + ["--no-input", "service_port=8080"], cwd=TEMPLATE, home=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    answers = replayed_answers(tmp_path)
    assert (answers["service_port"], answers["database"], answers["use_circuit_breaker"]) == ("8080", "sqlite", False)


def test_the_summary_names_the_choices_and_what_was_left_off(cookies, capfd):
    """After generation: Python version, database, outbox transport, and each feature left off with the answer that adds it."""
    answers = {
        **defaults(),
        "python_version": "3.13",
        "database": "mysql",
        "outbox": "in_process",
        "use_tracing": False,
        "use_kubernetes": False,
    }
    capfd.readouterr()
    bake_or_fail(cookies, answers)
    lines = capfd.readouterr().out.splitlines()
    assert lines[1:4] == ["  Python:   3.13", "  Database: mysql", "  Outbox:   in_process"]
    left_off = lines[lines.index("Left off (generate again with the answer shown to add one):") + 1 : lines.index("Next:")]
    assert left_off == ["  - OpenTelemetry tracing: use_tracing=yes", "  - Kubernetes manifests: use_kubernetes=yes"]
    titled = [feature for feature in feature_table().FEATURES if feature.title]
    assert len(titled) == sum(isinstance(value, bool) for value in cookiecutter_json().values()) + 1  # + the outbox


def test_nothing_left_off_is_said_so_by_omission(cookies, capfd):
    """With every feature on, no "Left off" section; with the outbox off, it says how to turn it on."""
    capfd.readouterr()
    bake_or_fail(cookies, {**defaults(), "use_kubernetes": True})
    assert "Left off" not in capfd.readouterr().out
    bake_or_fail(cookies, {**defaults(), "outbox": "none"})
    assert "  - Transactional outbox: outbox=rabbitmq or in_process" in capfd.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def project_312(cookies_session) -> Path:
    return bake_or_fail(cookies_session, {**defaults(), "database": "sqlite", "python_version": "3.12"}).path


@pytest.fixture(scope="module")
def venv_311(tmp_path_factory) -> Path:
    """A virtualenv of Python 3.11 (the template's own interpreter is 3.11 or newer)."""
    python = shutil.which("python3.11")
    if python is None:
        pytest.skip("python3.11 is not installed")
    venv = tmp_path_factory.mktemp("venv") / "v311"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "bin" / ".installed").touch()
    return venv


def make_target(project: Path, target: str, venv: Path, *variables: str):
    command = [shutil.which("make"), "--no-print-directory", "-o", str(venv / "bin" / ".installed"), target, f"VENV={venv}", *variables]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=60)


def test_make_says_in_one_line_when_python_is_older_than_required(project_312, venv_311):
    """make run/serve/test on a 3.11 virtualenv for a 3.12 project: one warning line naming both versions."""
    result = make_target(project_312, "check-python", venv_311)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"warning: {venv_311} runs Python 3.11, older than the 3.12 this project requires "
        "(pyproject.toml); with python3.12 installed: make clean install"
    ]
    makefile = (project_312 / "Makefile").read_text()
    for target in ("run", "serve", "test"):
        assert f"\n{target}: check-python " in makefile


def test_make_is_quiet_when_python_is_recent_enough(project_312, venv_311):
    """The same virtualenv for a project that asks for 3.11: nothing is said."""
    result = make_target(project_312, "check-python", venv_311, "REQUIRED_PYTHON=3.11")
    assert (result.returncode, result.stdout) == (0, "")


def test_make_prefers_the_required_python_when_installed(project_312, tmp_path):
    """.venv is made with python3.12 when it is on PATH, with python3 otherwise."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.12").write_text("#!/bin/sh\n")
    (bin_dir / "python3.12").chmod(0o755)
    # make and its /bin/sh are called by absolute path: PATH is only where Pythons are looked for.
    dry_run = [shutil.which("make"), "--no-print-directory", "-n", ".venv/bin/.installed"]
    with_it = subprocess.run(dry_run, cwd=project_312, env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert with_it.stdout.splitlines()[0] == f"{bin_dir}/python3.12 -m venv .venv"
    (bin_dir / "python3.12").unlink()
    without = subprocess.run(dry_run, cwd=project_312, env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert without.stdout.splitlines()[0] == "python3 -m venv .venv"
