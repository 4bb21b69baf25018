"""Bad answers stop generation with one clear line; odd but valid answers give working code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.combinations import defaults

BAD_ANSWERS = [
    ({"service_slug": "Orders_Service"}, "service_slug = 'Orders_Service': must be a DNS label"),
    ({"service_slug": "-orders"}, "service_slug = '-orders': must be a DNS label"),
    ({"service_slug": "orders-"}, "service_slug = 'orders-': must be a DNS label"),
    ({"service_slug": "orders--api"}, "service_slug = 'orders--api': must be a DNS label"),
    ({"service_slug": "9orders"}, "service_slug = '9orders': must be a DNS label"),
    ({"service_slug": "a" * 64}, "must be a DNS label"),
    ({"service_slug": "migrate"}, "service_slug = 'migrate': is the name of a docker-compose service"),
    ({"service_name": "   "}, "service_name = '   ': must not be empty"),
    ({"description": "two\nlines"}, "description = 'two\\nlines': must be one line without control characters"),
    ({"author_email": "nobody"}, "author_email = 'nobody': must look like name@example.com"),
    ({"author_email": "a@b"}, "author_email = 'a@b': must look like name@example.com"),
    ({"resource_name": "Order"}, "resource_name = 'Order': must be a snake_case name"),
    ({"resource_name": "order-item"}, "resource_name = 'order-item': must be a snake_case name"),
    ({"resource_name": "2nd_order"}, "resource_name = '2nd_order': must be a snake_case name"),
    ({"resource_name": "class"}, "resource_name = 'class': must not be a Python keyword"),
    ({"resource_name": "match"}, "resource_name = 'match': must not be a Python keyword"),
    ({"resource_name": "health"}, "resource_name = 'health': is a name the generated service already uses"),
    ({"resource_name": "outbox_event"}, "resource_name = 'outbox_event': is a name the generated service already uses"),
    ({"resource_plural": "order"}, "resource_plural = 'order': must differ from resource_name"),
    ({"service_port": "0"}, "service_port = '0': must be an integer from 1 to 65535"),
    ({"service_port": "65536"}, "service_port = '65536': must be an integer from 1 to 65535"),
    ({"service_port": "http"}, "service_port = 'http': must be an integer from 1 to 65535"),
    ({"service_port": " 5000"}, "service_port = ' 5000': must be an integer from 1 to 65535"),
    ({"service_port": "05000"}, "service_port = '05000': must be an integer from 1 to 65535"),
    ({"api_version": "1"}, "api_version = '1': must be 'v' followed by a positive integer"),
    ({"api_version": "v0"}, "api_version = 'v0': must be 'v' followed by a positive integer"),
    (
        {"service_port": "9090", "use_metrics": True},
        "service_port = '9090': is already published by the prometheus service of the metrics feature",
    ),
]


@pytest.mark.parametrize(("answers", "message"), BAD_ANSWERS, ids=[m.split(":")[0] for _, m in BAD_ANSWERS])
def test_bad_answer_stops_with_one_clear_line(cookies, capfd, answers, message):
    """Generation fails, prints one ERROR line naming question, value and rule, and leaves nothing."""
    result = cookies.bake(extra_context=answers)
    err = capfd.readouterr().err
    assert result.exit_code != 0
    errors = [line for line in err.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, err
    assert message in errors[0]
    output_root = Path(str(cookies._output_factory.__self__))
    assert [path for path in output_root.rglob("*") if path.is_file()] == []


def test_port_that_clashes_only_with_a_disabled_feature_is_fine(cookies):
    """Port 9090 is refused only when Prometheus is actually part of the compose file."""
    result = cookies.bake(extra_context={"service_port": "9090", "use_metrics": False})
    assert result.exit_code == 0, result.exception


HOSTILE = {
    # {% raw %} keeps the braces literal: the final answer contains "{{ x }}".
    "service_name": "Zoë's \"Bücher\" \\ {% raw %}{{ x }}{% endraw %} Service",
    "description": "Says \"hi\", ends with a backslash \\, has '''quotes''', \"\"\" and {% raw %}{{ braces }} {% if %}{% endraw %} — 日本語",
    "author_name": "O'Brien \"Bob\" \\n Ñúñez",
    "author_email": "o'brien+tag@example.co.uk",
}


@pytest.fixture(scope="module")
def hostile_project(cookies_session):
    result = cookies_session.bake(extra_context={**defaults(), **HOSTILE, "database": "sqlite"})
    assert result.exit_code == 0, result.exception
    return result.project_path


def test_hostile_text_keeps_python_valid(hostile_project):
    """Quotes, backslashes, braces and non-ASCII in free-text answers still give valid Python."""
    for path in hostile_project.rglob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"))


def test_hostile_text_arrives_verbatim(hostile_project):
    """The service's OpenAPI title and description are exactly what was typed."""
    namespace: dict = {}
    source = (hostile_project / "config.py").read_text(encoding="utf-8")
    title = re.search(r"self\.API_TITLE = (.*)", source).group(1)
    exec(f"value = {title}", namespace)  # noqa: S102 - evaluating one literal we rendered
    assert namespace["value"] == "Zoë's \"Bücher\" \\ {{ x }} Service"


def test_hostile_text_passes_ruff(hostile_project):
    """The project with hostile answers is still ruff-clean."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=hostile_project,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_hostile_text_keeps_pyproject_exact(hostile_project):
    """pyproject.toml keeps the author and description exactly."""
    project = tomllib.loads((hostile_project / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["description"] == HOSTILE["description"].replace("{% raw %}", "").replace("{% endraw %}", "")
    assert project["authors"][0]["name"] == HOSTILE["author_name"]
