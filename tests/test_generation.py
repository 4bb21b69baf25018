"""Every combination of toggles and choices renders into a clean, consistent project."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.combinations import all_combinations, impossible_combinations
from tests.conftest import param_ids, render_project

COMBINATIONS = all_combinations()
TEXT_SUFFIXES = (".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".json", ".ini", ".cfg", ".mako", ".example")
TEXT_NAMES = ("Dockerfile", "Makefile", ".gitignore", ".dockerignore", "README")
#: A Jinja tag, or the word cookiecutter (but not the pinned package `make update` uses).
RESIDUE = re.compile(r"\{\{|\{%|\{#|cookiecutter(?!==\d)")


@pytest.fixture(scope="session", params=COMBINATIONS, ids=param_ids(COMBINATIONS))
def project(request, cookies_session):
    return render_project(request, cookies_session)


def text_files(project):
    """The generated text files; .cruft.json (the record of the template and its answers) aside."""
    return [path for path in project.files(TEXT_SUFFIXES + TEXT_NAMES) if path.name != ".cruft.json"]


def test_no_template_residue(project):
    """No file keeps a Jinja tag or the word cookiecutter."""
    leftovers = [
        f"{path.relative_to(project.path)}:{number}: {line.strip()}"
        for path in text_files(project)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if RESIDUE.search(line)
    ]
    assert leftovers == []


def test_no_template_residue_in_file_names(project):
    """No file or folder name keeps a Jinja tag."""
    assert [p for p in project.path.rglob("*") if "{" in p.name or "}" in p.name] == []


def test_every_python_file_compiles(project):
    """Every .py file is valid Python."""
    for path in project.files((".py",)):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_ruff_passes(project):
    """ruff, with the project's own configuration, finds nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=project.path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_blank_lines_read_as_hand_written(project):
    """No run of blank lines a person would not write, and no trailing whitespace."""
    problems = []
    for path in text_files(project):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(project.path)
        if text and not text.endswith("\n"):
            problems.append(f"{name}: no newline at the end")
        if text.endswith("\n\n"):
            problems.append(f"{name}: blank lines at the end")
        limit = 2 if path.suffix in (".py", ".mako") else 1
        blank_run = 0
        for number, line in enumerate(text.splitlines(), 1):
            if line != line.rstrip():
                problems.append(f"{name}:{number}: trailing whitespace")
            blank_run = blank_run + 1 if not line.strip() else 0
            if blank_run > limit:
                problems.append(f"{name}:{number}: {blank_run} blank lines in a row")
            if path.suffix == ".py" and blank_run == 2 and number < len(text.splitlines()):
                following = text.splitlines()[number]
                if following.startswith((" ", "\t")):
                    problems.append(f"{name}:{number}: 2 blank lines inside a block")
    assert problems == []


def test_feature_files_follow_the_table(project, table):
    """Files of enabled features exist; files of disabled ones are gone."""
    for feature in table.FEATURES:
        for relative in feature.files:
            exists = (project.path / relative).exists()
            assert exists == feature.is_enabled(project.context), (feature.name, relative)


def test_compose_has_exactly_the_expected_services(project, table):
    """docker-compose.yml runs the service, its migration, and each enabled feature's services."""
    compose = yaml.safe_load((project.path / "docker-compose.yml").read_text())
    expected = {project.context["service_slug"], "migrate"}
    for feature in table.enabled_features(project.context):
        expected.update(feature.compose_services)
    assert set(compose["services"]) == expected
    for name, service in compose["services"].items():
        if "image" in service and "build" not in service:
            assert re.search(r":[\w.-]+$", service["image"]), f"{name}: image must be pinned"
            assert not service["image"].endswith(":latest"), f"{name}: image must be pinned"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in compose["services"], (name, dependency)
            assert condition["condition"] in {"service_healthy", "service_completed_successfully"}
            if condition["condition"] == "service_healthy" and dependency != project.context["service_slug"]:
                assert "healthcheck" in compose["services"][dependency], dependency


def test_migrations_create_the_enabled_tables(project, table):
    """One migration per enabled feature with tables, named by its fixed revision, creating exactly them."""
    versions = project.path / "migrations" / "versions"
    values = table.format_values(project.context)
    expected = {
        f"{table.migration_revision(feature)}.py": {
            table.MIGRATION_TABLES[name][0].split('"', 2)[1].format(**values) for name in feature.tables
        }
        for feature in table.enabled_features(project.context)
        if feature.tables
    }
    found = {path.name: path.read_text() for path in versions.glob("*.py")}
    assert set(found) == set(expected)
    for name, source in found.items():
        assert set(re.findall(r'op\.create_table\(\s*"(\w+)"', source)) == expected[name], name


def test_structured_files_parse(project):
    """Every YAML, TOML and JSON file parses."""
    for path in project.files((".yml", ".yaml")):
        list(yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    for path in project.files((".toml",)):
        tomllib.loads(path.read_text())
    for path in project.files((".json",)):
        json.loads(path.read_text())


def test_requirements_are_pinned(project):
    """Every requirement is pinned to one version, and SQLAlchemy stays below 2.1."""
    lines = [
        line.split("#")[0].strip()
        for line in (project.path / "requirements.txt").read_text().splitlines()
    ]
    requirements = [line for line in lines if line and not line.startswith("-")]
    assert requirements
    assert [r for r in requirements if "==" not in r] == []
    sqlalchemy = next(r for r in requirements if r.lower().startswith("sqlalchemy=="))
    assert sqlalchemy.split("==")[1].startswith("2.0.")


def test_database_driver_matches_the_answer(project):
    """The database answer selects exactly one driver requirement."""
    text = (project.path / "requirements.txt").read_text().lower()
    database = project.context["database"]
    assert ("psycopg" in text) == (database == "postgresql")
    assert ("pymysql" in text) == (database == "mysql")


IMPOSSIBLE = impossible_combinations()


@pytest.mark.parametrize("answers", IMPOSSIBLE, ids=param_ids(IMPOSSIBLE))
def test_impossible_combination_is_refused(answers, cookies, capfd, table):
    """A combination the feature table marks impossible stops with its reason and leaves nothing."""
    result = cookies.bake(extra_context=answers)
    err = capfd.readouterr().err
    assert result.exit_code != 0
    reasons = [reason for _, _, reason in table.incompatible_answers(answers)]
    assert any(reason in err for reason in reasons), err
