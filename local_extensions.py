"""Jinja filters the template uses to put answers into generated files safely."""

import json

from cookiecutter.utils import simple_filter


@simple_filter
def py_string(value):
    """Render an answer as a double-quoted string literal.

    JSON string syntax is also valid Python, TOML and YAML string syntax for
    the characters the pre-generation hook lets through (no control
    characters), so one filter keeps quotes, backslashes, braces and
    non-ASCII text from ever breaking the generated code.
    """
    return json.dumps(str(value), ensure_ascii=False)
