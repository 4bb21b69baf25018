"""Jinja filters the template uses to put answers into generated files safely.

cookiecutter imports this module before it asks the first question, which is
also what lets it keep a refused answer's output to what helps (see
QuietRefusedAnswer).
"""

import json
import logging

from cookiecutter.utils import simple_filter


class QuietRefusedAnswer(logging.Filter):
    """Drop cookiecutter's traceback after the pre-generation hook refused an answer.

    The hook has already printed the one ERROR line naming the answer and the
    rule, and the command that asks again with the other answers kept;
    cookiecutter would follow that with an ERROR line of its own and the
    FailedHookException traceback, which say nothing more. A hook that
    crashes still shows its own traceback, and post-generation failures are
    not touched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.startswith("Stopping generation because") and record.args == ("pre_gen_project",))


_hooks_logger = logging.getLogger("cookiecutter.hooks")
if not any(isinstance(existing, QuietRefusedAnswer) for existing in _hooks_logger.filters):
    _hooks_logger.addFilter(QuietRefusedAnswer())


@simple_filter
def py_string(value):
    """Render an answer as a double-quoted string literal.

    JSON string syntax is also valid Python, TOML and YAML string syntax for
    the characters the pre-generation hook lets through (no control
    characters), so one filter keeps quotes, backslashes, braces and
    non-ASCII text from ever breaking the generated code.
    """
    return json.dumps(str(value), ensure_ascii=False)
