"""The template's tests cannot be fooled: each way an audit found to slip a broken change
through is tried here, and the check that must catch it is shown catching it.

Mutations are made to a copy of the template or of the hook's feature table,
never to the real one; each test renders only the one or two combinations it
needs (in process, tests/rendering.py) or runs a tiny stand-in project through
the real generated-suite runner (tests/suites.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from tests.combinations import TEMPLATE, defaults, matrix_questions
from tests.content_checks import CONTENT_CHECKS
from tests.matrix import check_contents, import_contract_problems, render_matrix, ruff_problems
from tests.project_checks import compose_problems, import_problems, workflow_problems
from tests.rendering import Hook, Renderer
from tests.suites import (
    SuiteFailed,
    Unavailable,
    build_venv,
    find_python,
    load_time_imports,
    make_test,
    missing_imports,
)
from tests.test_generated_suites import SUITES, missing_pairs

PROJECT = next(TEMPLATE.glob("{{*}}")).name
ALL_OFF = {
    **{key: False for key, values in matrix_questions().items() if values[0] is True or values[0] is False},
    "database": "sqlite",
    "outbox": "none",
}


@pytest.fixture
def template_copy(tmp_path) -> Path:
    """A copy of the template to break."""
    copy = tmp_path / "template"
    top_level_only = {".venv", ".cache", ".git", "tests", "bench"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name in {"__pycache__", ".pytest_cache"}}
        return skipped | (top_level_only & set(names) if Path(folder) == TEMPLATE else set())

    shutil.copytree(TEMPLATE, copy, ignore=ignore)
    return copy


def hook_with(**changes) -> object:
    """A fresh copy of the post-generation hook module whose FEATURES rows are changed."""
    module = Hook(TEMPLATE / "hooks" / "post_gen_project.py").module
    module.FEATURES = tuple(
        dataclasses.replace(row, **changes[row.name]) if row.name in changes else row for row in module.FEATURES
    )
    return module


def render_one(answers: dict, template: Path = TEMPLATE, post_gen=None):
    matrix = render_matrix([answers], Renderer(template, post_gen))
    assert not matrix.refused, matrix.refused
    return matrix


# --- finding 1: a suite's first run is its result ---------------------------------------------------


def stand_in_project(tmp_path: Path, tests: str, pytest_config: str = "") -> Path:
    """A project whose `make test` runs these tests with pytest, as a generated Makefile does."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "Makefile").write_text(f"test:\n\t{sys.executable} -m pytest -p no:cacheprovider\n")
    (project / "pyproject.toml").write_text(f'[tool.pytest.ini_options]\ntestpaths = ["tests"]\n{pytest_config}')
    (project / "tests" / "test_stand_in.py").write_text(textwrap.dedent(tests))
    return project


FLAKY_THEN_PASSING = """
    from pathlib import Path

    def test_fails_the_first_time():
        marker = Path(__file__).with_name("ran-once")
        first = not marker.exists()
        marker.touch()
        assert not first, "first run"

    def test_fine():
        pass
"""


@pytest.mark.parametrize(
    ("tests", "expected"),
    [
        (FLAKY_THEN_PASSING, "FAILURE"),
        ("import pytest\n\ndef test_a():\n    pytest.skip('no broker')\n\ndef test_b():\n    pass\n", "SKIPPED"),
        ("import pytest\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError\n\ndef test_a(broken):\n    pass\n", "ERROR"),
        ("import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_a():\n    assert False\n", "SKIPPED"),
        ("import pytest\n\ndef test_a():\n    pytest.exit('stop', returncode=0)\n\ndef test_b():\n    pass\n", "passed of"),
        ('"""A test module that rendered empty."""\n', "collected no test"),
    ],
    ids=["fails-then-would-pass", "skip", "error", "xfail", "stops-early-with-exit-0", "no-test"],
)
def test_suite_runner_fails_anything_but_every_collected_test_passing(tmp_path, tests, expected):
    """Finding 1: no rerun, skips count, and a passed count below the collected count fails."""
    project = stand_in_project(tmp_path, tests)
    run = make_test(project, None, tmp_path)
    with pytest.raises(SuiteFailed, match=expected):
        run.judge()
    if "ran-once" in tests:
        # Had it been run a second time it would pass: the runner never gives it that chance.
        assert "1 failed" in run.output


def test_suite_runner_accepts_a_clean_run(tmp_path):
    """The same runner passes a suite whose every collected test passed (so the checks above can fail)."""
    project = stand_in_project(tmp_path, "def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    assert make_test(project, None, tmp_path).judge() == (2, 2)


def test_generated_pytest_config_fails_an_empty_parametrization(tmp_path):
    """Finding 4: with the generated pyproject.toml, `parametrize` over nothing fails instead of skipping."""
    rendered = render_one(defaults()).projects[0]
    config = rendered.text("pyproject.toml").split("[tool.pytest.ini_options]", 1)[1]
    tests = "import pytest\n\n@pytest.mark.parametrize('value', [])\ndef test_each(value):\n    pass\n\ndef test_ok():\n    pass\n"
    project = stand_in_project(tmp_path, tests, config.replace('testpaths = ["tests"]\n', ""))
    run = make_test(project, None, tmp_path)
    assert run.returncode != 0
    with pytest.raises(SuiteFailed):
        run.judge()


# --- finding 2: each project's own requirements, on its own Python ---------------------------------------


def test_a_requirement_under_the_wrong_toggle_is_caught_in_the_projects_own_venv(template_copy, tmp_path):
    """Finding 2: pika required only when metrics is on: the RabbitMQ outbox project without metrics lacks it."""
    requirements = template_copy / PROJECT / "requirements.txt"
    text = requirements.read_text()
    assert '{%- if cookiecutter.outbox == "rabbitmq" %}\npika==' in text
    text = text.replace('{%- if cookiecutter.outbox == "rabbitmq" %}\npika==', '{%- if cookiecutter.use_metrics %}\npika==')
    requirements.write_text(text)
    answers = {**ALL_OFF, "outbox": "rabbitmq"}
    project = render_one(answers, template_copy).projects[0]
    folder = project.write(tmp_path / "out")
    imports = load_time_imports(folder)  # before the venv exists in the folder, as the runner does
    try:
        venv = build_venv(folder, find_python("3.12"))
    except Unavailable as missing:
        pytest.fail(str(missing))
    missing = missing_imports(imports, venv)
    assert [item for item in missing if item.startswith("pika ")], missing


# --- finding 3: expectations from the rendered code, not from the table -----------------------------------


def test_a_feature_file_left_behind_is_caught():
    """Finding 3: tracing.py dropped from its FEATURES row stays in a project without tracing: nothing uses it."""
    tracing = next(row for row in hook_with().FEATURES if row.name == "tracing")
    files = tuple(path for path in tracing.files if path != "common_utils/tracing.py")
    project = render_one({**defaults(), "use_tracing": False}, post_gen=hook_with(tracing={"files": files})).projects[0]
    assert "common_utils/tracing.py" in project.files
    assert any(problem.startswith("common_utils/tracing.py: nothing imports") for problem in import_problems(project))


def test_a_compose_service_missing_for_a_setting_is_caught():
    """Finding 3: redis dropped from rate limiting's compose services leaves a URL pointing at nothing."""
    project = render_one(defaults(), post_gen=hook_with(rate_limiting={"compose_services": ()})).projects[0]
    problems = compose_problems(project)
    assert any("points at redis, which is not a compose service" in problem for problem in problems), problems


def test_a_compose_service_nothing_uses_is_caught():
    """Finding 3, the other way: redis kept but the setting pointing at it dropped."""
    project = render_one(defaults(), post_gen=hook_with(rate_limiting={"environment": {}})).projects[0]
    problems = compose_problems(project)
    assert "redis: no service of the project uses it (no setting points at it)" in problems, problems


def test_an_import_of_a_removed_module_is_caught():
    """Finding 3: a test module kept while the module it tests is removed imports what does not exist."""
    tracing = next(row for row in hook_with().FEATURES if row.name == "tracing")
    files = tuple(path for path in tracing.files if path != "tests/test_tracing.py")
    project = render_one({**defaults(), "use_tracing": False}, post_gen=hook_with(tracing={"files": files})).projects[0]
    assert any("imports common_utils.tracing, which the project does not have" in p for p in import_problems(project))


# --- finding 4: every file counted and checked ------------------------------------------------------------


def test_a_test_module_rendering_empty_is_caught(template_copy):
    """Finding 4: tests/test_health.py wrapped in a condition that is never true renders without a test."""
    path = template_copy / PROJECT / "tests" / "test_health.py"
    path.write_text("{%- if cookiecutter.use_metrics == 'never' %}\n" + path.read_text() + "{%- endif %}\n")
    problems = check_contents(render_one(defaults(), template_copy), CONTENT_CHECKS)
    assert any(problem.startswith("tests/test_health.py: defines no test") for problem in problems["has_tests"])


def test_a_template_tag_in_a_file_of_any_suffix_is_caught(template_copy):
    """Finding 4: a shell script that keeps a template tag (here through {% raw %})."""
    script = template_copy / PROJECT / "scripts" / "entrypoint.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n# {% raw %}{{ cookiecutter.service_slug }}{% endraw %}\nexec gunicorn\n")
    problems = check_contents(render_one(defaults(), template_copy), CONTENT_CHECKS)
    assert any(problem.startswith("scripts/entrypoint.sh:2:") for problem in problems["residue"]), problems["residue"]


def test_an_unpinned_dev_requirement_is_caught(template_copy):
    """Finding 4: requirements-dev.txt is held to exact pins like requirements.txt."""
    path = template_copy / PROJECT / "requirements-dev.txt"
    path.write_text(path.read_text() + "coverage>=7\n")
    problems = check_contents(render_one(defaults(), template_copy), CONTENT_CHECKS)
    assert any("'coverage>=7' must pin exactly one version" in problem for problem in problems["pins"])


def test_a_lint_finding_in_one_combination_is_caught(template_copy, tmp_path):
    """The single ruff run over distinct files reports a finding of one combination's file, in its context."""
    path = template_copy / PROJECT / "app" / "__init__.py"
    path.write_text(path.read_text() + "{%- if not cookiecutter.use_metrics %}\nimport os\n{%- endif %}\n")
    matrix = render_matrix([defaults(), {**defaults(), "use_metrics": False}], Renderer(template_copy))
    problems, _ = ruff_problems(matrix, tmp_path / "ruff")
    assert [p for p in problems if p.startswith("app/__init__.py:") and "F401" in p and "no_metrics" in p], problems


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("common_utils/health.py", "from app.errors import error_response\n", "common_utils is not allowed to import app"),
        ("common_utils/outbox/model.py", "def later():\n    from common_utils.outbox import relay\n", "No cycles are allowed in common_utils.outbox"),
    ],
    ids=["common_utils-imports-app", "lazy-import-cycle"],
)
def test_a_broken_import_layer_is_caught(tmp_path, module, line, expected):
    """The import contracts fail for a common_utils module importing app, and for a cycle closed inside a function."""
    project = render_one(defaults()).projects[0]
    assert import_contract_problems([project], tmp_path / "clean") == []
    project.files[module] += b"\n\n" + line.encode()
    problems = import_contract_problems([project], tmp_path / "broken")
    assert len(problems) == 1, problems
    assert expected in problems[0]


# --- finding 5: pairs counted from the rendered matrix --------------------------------------------------------


def test_a_pair_missing_from_the_generated_suites_is_caught(matrix):
    """Finding 5: drop the suite that runs the in-process outbox on MySQL, and that pair is reported missing."""
    accepted = [project.answers for project in matrix.projects]
    suites = [suite.answers for suite in SUITES]
    assert missing_pairs(accepted, suites) == set()
    without = [answers for answers in suites if not (answers["database"] == "mysql" and answers["outbox"] == "in_process")]
    assert (("database", "mysql"), ("outbox", "in_process")) in missing_pairs(accepted, without)


# --- finding 6: the generated CI may not skip service tests ------------------------------------------------


def test_a_generated_workflow_without_test_require_services_is_caught(template_copy):
    """Finding 6: the project's CI must set TEST_REQUIRE_SERVICES, or its service tests may skip there."""
    path = template_copy / PROJECT / ".github" / "workflows" / "ci.yml"
    text = path.read_text()
    assert 'TEST_REQUIRE_SERVICES: "1"\n' in text
    path.write_text(text.replace('      TEST_REQUIRE_SERVICES: "1"\n', ""))
    project = render_one(defaults(), template_copy).projects[0]
    assert any("does not set TEST_REQUIRE_SERVICES" in problem for problem in workflow_problems(project))
