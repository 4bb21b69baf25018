"""Jinja extensions the template uses: answers into generated files safely, and the hooks' way home.

cookiecutter imports this module before it asks the first question, which is
also what lets it keep a refused answer's output to what helps (see
QuietRefusedAnswer).
"""

import json
import logging
import os

from cookiecutter.utils import simple_filter
from jinja2 import pass_context
from jinja2.ext import Extension


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


class TemplateFolder(Extension):
    """`{{ template_folder() }}` in a hook: the absolute path of the template being rendered.

    The hooks need their template's folder (the pre-generation hook reads the feature
    table in hooks/post_gen_project.py, the post-generation hook asks git for the commit).
    The context has it as `_repo_dir` only under plain cookiecutter, and there it may be
    relative to wherever cookiecutter was started; cruft and other callers of
    `generate_files` leave it out. But whoever drives cookiecutter, it renders a hook
    while working in the template's folder (that is how it finds `hooks/`), so the
    working directory at render time is the answer, unless an absolute `_repo_dir` (set
    by a caller that renders hooks from elsewhere) says otherwise.
    """

    def __init__(self, environment):
        super().__init__(environment)
        environment.globals["template_folder"] = template_folder


@pass_context
def template_folder(context) -> str:
    repo_dir = context.get("cookiecutter", {}).get("_repo_dir")
    if repo_dir and os.path.isabs(repo_dir):
        return repo_dir
    return os.path.abspath(os.getcwd())
