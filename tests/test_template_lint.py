"""The template's own Python (hooks, tests, benchmarks) is ruff-clean."""

import subprocess
import sys

import pytest

from tests.combinations import TEMPLATE


def test_template_python_passes_ruff():
    """ruff finds nothing in the hooks, the Jinja filter, the tests and the benchmarks."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "hooks", "tests", "bench", "local_extensions.py"],
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("hook", ["pre_gen_project.py", "post_gen_project.py"])
def test_hooks_have_no_stray_template_tags(hook):
    """A hook is rendered by Jinja: its only tags are the rendered context and template folder lines."""
    source = (TEMPLATE / "hooks" / hook).read_text()
    tagged = [line for line in source.splitlines() if "{{" in line or "{%" in line or "{#" in line]
    assert tagged == [
        'RENDERED_CONTEXT = r"""{{ cookiecutter | tojson }}"""',
        "TEMPLATE_FOLDER = r'{{ template_folder() | tojson }}'  # tojson leaves no ' in it",
    ]


def test_every_feature_file_exists_in_the_template_and_has_one_owner():
    """Each file in the feature table exists in the template and belongs to one feature only."""
    from tests.combinations import feature_table

    (project,) = TEMPLATE.glob("{{*}}")
    owners: dict[str, str] = {}
    for feature in feature_table().FEATURES:
        for relative in feature.files:
            assert (project / relative).exists(), f"{feature.name}: {relative} is not in the template"
            assert relative not in owners, f"{relative} is owned by {owners[relative]} and {feature.name}"
            owners[relative] = feature.name
