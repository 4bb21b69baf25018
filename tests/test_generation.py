"""Every combination of toggles and choices renders into a clean, consistent project.

The `matrix` fixture renders each accepted combination once (and the edge
answers: other Python versions, a YAML-boolean slug, another port). Checks of a
file's content run once per distinct (path, content) and name the
combinations that hold a failing file; checks of a whole project run on every
project. Expectations come from the rendered code itself, never from the
feature table the hook used to render it (tests/project_checks.py).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
from cookiecutter.exceptions import FailedHookException
from cookiecutter.main import cookiecutter

from tests import ci_report
from tests.combinations import (
    TEMPLATE,
    all_combinations,
    combination_id,
    covering_set,
    impossible_combinations,
)
from tests.conftest import EDGE_ANSWERS
from tests.content_checks import CONTENT_CHECKS
from tests.matrix import (
    check_contents,
    check_projects,
    digest,
    import_contract_problems,
    linted_everywhere,
    ruff_problems,
)
from tests.project_checks import PROJECT_CHECKS
from tests.rendering import SCRATCH, render_with_cookiecutter


def test_every_accepted_combination_renders(matrix):
    """Each combination the template accepts, and each edge answer, rendered."""
    assert [project.answers for project in matrix.projects] == all_combinations() + EDGE_ANSWERS


def test_refused_combinations_are_exactly_the_impossible_ones(matrix, table):
    """The pre-generation hook refuses exactly what the table calls impossible, in one ERROR line with the reason."""
    assert [answers for answers, _ in matrix.refused] == impossible_combinations()
    for answers, message in matrix.refused:
        errors = [line for line in message.splitlines() if line.startswith("ERROR: ")]
        assert len(errors) == 1, message
        reasons = [reason for _, _, reason in table.incompatible_answers(answers)]
        assert any(reason in errors[0] for reason in reasons), (combination_id(answers), message)


@pytest.mark.parametrize(
    "answers",
    [*covering_set(), *EDGE_ANSWERS],
    ids=[combination_id(a) for a in [*covering_set(), *EDGE_ANSWERS]],
)
def test_in_process_render_is_faithful(matrix, answers):
    """The in-process render is byte for byte, mode for mode, what the real cookiecutter writes."""
    (fast,) = [project for project in matrix.projects if project.answers == answers]
    real = render_with_cookiecutter(answers)
    assert sorted(fast.files) == sorted(real.files)
    assert [path for path in fast.files if fast.files[path] != real.files[path]] == []
    assert fast.modes == real.modes
    assert fast.folders == real.folders
    without_output = {key: value for key, value in real.context.items() if key != "_output_dir"}
    assert {key: value for key, value in fast.context.items() if key != "_output_dir"} == without_output


def test_refusal_is_what_cookiecutter_prints(matrix, capfd):
    """A refused combination fails the real cookiecutter with the line the in-process check recorded."""
    answers, message = matrix.refused[0]
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        config = {"replay_dir": f"{tmp}/replay", "cookiecutters_dir": f"{tmp}/cache"}
        with pytest.raises(FailedHookException), contextlib.redirect_stdout(io.StringIO()):
            cookiecutter(str(TEMPLATE), no_input=True, extra_context=answers, output_dir=tmp, default_config=config)
        assert not [path for path in Path(tmp).iterdir() if path.name not in {"replay", "cache"}]
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert errors == [line for line in message.splitlines() if line.startswith("ERROR")]


# --- each distinct file, once ---------------------------------------------------------------


@pytest.fixture(scope="module")
def content_problems(matrix):
    problems = check_contents(matrix, CONTENT_CHECKS)
    ci_report.REPORT.counts["content checks"] = (
        f"{', '.join(CONTENT_CHECKS)} on each of {len(matrix.holders)} distinct files"
    )
    return problems


def test_no_template_residue(content_problems):
    """No file, whatever its name or suffix, keeps a Jinja tag or the word cookiecutter."""
    assert content_problems["residue"] == []


def test_files_read_as_hand_written(content_problems):
    """Final newline, no trailing whitespace, no blank-line run a person would not write."""
    assert content_problems["layout"] == []


def test_python_compiles_and_data_files_parse(content_problems):
    """Every .py compiles; every YAML, TOML, JSON and INI file parses."""
    assert content_problems["parses"] == []


def test_requirements_are_pinned(content_problems):
    """Every line of requirements.txt and requirements-dev.txt pins one version; SQLAlchemy stays 2.0."""
    assert content_problems["pins"] == []


def test_every_test_module_defines_tests(content_problems):
    """No tests/test_*.py renders without a test in it."""
    assert content_problems["has_tests"] == []


def test_every_file_of_every_combination_is_checked(matrix):
    """The content checks ran on exactly the files the projects are made of."""
    made_of = {(path, digest(data)) for project in matrix.projects for path, data in project.files.items()}
    assert made_of == set(matrix.holders)


def test_file_and_folder_names_have_no_template_residue(matrix):
    """No file or folder name keeps a Jinja tag."""
    names = {name for project in matrix.projects for name in [*project.files, *project.folders]}
    assert sorted(name for name in names if "{" in name or "}" in name or "cookiecutter" in name) == []


def test_ruff_passes(matrix, tmp_path):
    """ruff, with each project's own configuration, finds nothing in any Python file of any combination."""
    problems, layout = ruff_problems(matrix, tmp_path)
    assert problems == []
    assert linted_everywhere(matrix, layout) == []
    ci_report.REPORT.counts["ruff"] = f"one run over {len(layout.origin)} distinct Python files"


def test_import_contracts_hold(matrix, tmp_path):
    """import-linter, with each project's own contracts: common_utils never imports app, and no import cycle.

    Run on the covering set (every pair of answers at least once) and the edge
    answers rather than on every combination (a run costs 0.2 s, the whole
    matrix more than a minute): an import exists when its module does and,
    at most, when one more answer's condition holds, so every pair covers
    every import, and every cycle of two conditional imports.
    """
    chosen = [*covering_set(), *EDGE_ANSWERS]
    projects = [project for project in matrix.projects if project.answers in chosen]
    assert len(projects) == len(chosen)
    assert import_contract_problems(projects, tmp_path) == []


# --- each project, as a whole -----------------------------------------------------------------


@pytest.fixture(scope="module")
def project_problems(matrix):
    return check_projects(matrix, PROJECT_CHECKS)


def test_every_module_is_used_and_every_import_resolves(project_problems):
    """From the entry points (main, gunicorn, migrations, tests, `python -m`), every module is reached
    and every import of the project's own code names a module and a name that exist."""
    assert project_problems["imports"] == []


def test_compose_connects_what_the_code_uses(project_problems):
    """Every host compose points the service at is a healthy, awaited service; every service is used."""
    assert project_problems["compose"] == []


def test_migrations_create_the_models_tables(project_problems):
    """The migrations create exactly the tables the models declare."""
    assert project_problems["migration"] == []


def test_requirement_includes_exist(project_problems):
    """Every `-r file` in a requirements file names a file of the project."""
    assert project_problems["requirements"] == []


def test_project_ci_requires_its_services(project_problems):
    """The generated CI sets TEST_REQUIRE_SERVICES and gives the tests every service URL they read."""
    assert project_problems["workflow"] == []


def test_database_driver_matches_the_answer(matrix):
    """The database answer selects exactly one driver requirement."""
    for project in matrix.projects:
        text = project.text("requirements.txt").lower()
        database = project.answers["database"]
        assert ("psycopg" in text) == (database == "postgresql"), combination_id(project.answers)
        assert ("pymysql" in text) == (database == "mysql"), combination_id(project.answers)
