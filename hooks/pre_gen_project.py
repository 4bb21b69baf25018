"""Check every answer before anything is written.

On the first bad answer this prints one line naming the question, the value
and the rule, then the command that asks the questions again with every
other answer kept as the default, and exits 1; cookiecutter then removes the
half-made folder (and local_extensions.py keeps its traceback off the screen).
"""

from __future__ import annotations

import importlib.util
import json
import keyword
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

RENDERED_CONTEXT = r"""{{ cookiecutter | tojson }}"""
#: The template's own folder, from the TemplateFolder extension (local_extensions.py).
TEMPLATE_FOLDER = r'{{ template_folder() | tojson }}'  # tojson leaves no ' in it

SLUG = re.compile(r"^[a-z](?:[a-z0-9]|-(?=[a-z0-9]))*$")
IDENTIFIER = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
API_VERSION = re.compile(r"^v[1-9][0-9]*$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# Jinja's opening tags, spelled so that cookiecutter rendering this hook leaves them be.
JINJA_TAGS = ("{" + "{", "{" + "%", "{" + "#")
RAW_START, RAW_END = "{" + "% raw %" + "}", "{" + "% endraw %" + "}"

#: Names the generated service already uses for its URLs, modules or tables.
RESERVED_RESOURCE_NAMES = frozenset(
    {
        "alembic_version", "api", "app", "common_utils", "config", "db", "docs",
        "error", "errors", "extensions", "health", "main", "metric", "metrics",
        "migrate", "migration", "migrations", "model", "models", "openapi",
        "outbox", "outbox_event", "processed_message", "ready", "route", "routes",
        "schema", "schemas", "test", "tests", "version", "versions",
    }
)  # fmt: skip


class BadAnswer(Exception):
    def __init__(self, question: str, value, rule: str):
        super().__init__(f"{question} = {value!r}: {rule}")
        self.question = question


def template_dir() -> Path:
    """The template's folder, from the TemplateFolder extension (local_extensions.py).

    Not the context's `_repo_dir`, which only plain cookiecutter provides (and
    relative to where it was started): cruft (create and update) renders
    without it.
    """
    return Path(json.loads(TEMPLATE_FOLDER))


def load_feature_table():
    """Import the post-generation hook's FEATURES table (the single source)."""
    path = template_dir() / "hooks" / "post_gen_project.py"
    spec = importlib.util.spec_from_file_location("feature_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def check_text(context: dict, question: str, max_length: int, required: bool = True) -> None:
    value = context[question]
    if required and not value.strip():
        raise BadAnswer(question, value, "must not be empty")
    if len(value) > max_length:
        raise BadAnswer(question, value, f"must be at most {max_length} characters")
    if CONTROL.search(value):
        raise BadAnswer(question, value, "must be one line without control characters")


def check_identifier(context: dict, question: str) -> None:
    value = context[question]
    if not IDENTIFIER.match(value) or len(value) > 40:
        raise BadAnswer(
            question,
            value,
            "must be a snake_case name: lowercase letters, digits and single "
            "underscores, starting with a letter, at most 40 characters",
        )
    if keyword.iskeyword(value) or keyword.issoftkeyword(value):
        raise BadAnswer(question, value, "must not be a Python keyword")
    if value in RESERVED_RESOURCE_NAMES:
        raise BadAnswer(question, value, "is a name the generated service already uses")


def validate(context: dict, table) -> None:
    check_text(context, "service_name", 80)
    slug = context["service_slug"]
    if not SLUG.match(slug) or len(slug) > 63:
        raise BadAnswer(
            "service_slug",
            slug,
            "must be a DNS label: lowercase letters, digits and single hyphens, "
            "starting with a letter, not ending with a hyphen, at most 63 characters",
        )
    if slug in table.COMPOSE_SERVICES or slug == "migrate":
        raise BadAnswer("service_slug", slug, "is the name of a docker-compose service")
    check_text(context, "description", 200, required=False)
    check_text(context, "author_name", 100)
    email = context["author_email"]
    if not EMAIL.match(email) or len(email) > 254 or CONTROL.search(email):
        raise BadAnswer("author_email", email, "must look like name@example.com")

    check_identifier(context, "resource_name")
    check_identifier(context, "resource_plural")
    if context["resource_plural"] == context["resource_name"]:
        raise BadAnswer(
            "resource_plural", context["resource_plural"], "must differ from resource_name"
        )

    port_text = str(context["service_port"])
    if not port_text.isdigit() or port_text.startswith("0") or not 1 <= int(port_text) <= 65535:
        raise BadAnswer("service_port", context["service_port"], "must be an integer from 1 to 65535, without leading zeros")
    port = int(port_text)
    for feature in table.enabled_features(context):
        for service in feature.compose_services:
            published = [
                int(mapping.split(":")[0]) for mapping in table.COMPOSE_SERVICES[service].get("ports", [])
            ]
            if port in published:
                raise BadAnswer(
                    "service_port",
                    context["service_port"],
                    f"is already published by the {service} service of the {feature.name} feature",
                )

    if not API_VERSION.match(context["api_version"]):
        raise BadAnswer("api_version", context["api_version"], "must be 'v' followed by a positive integer, like v1")

    # Combinations a feature cannot work with, from the feature table.
    for feature, answers, reason in table.incompatible_answers(context):
        (question, value), *others = answers.items()
        chosen = {**dict(others), **feature.when}
        with_text = " and ".join(f"{key} = {json.dumps(item)}" for key, item in chosen.items())
        raise BadAnswer(question, value, f"cannot be combined with {with_text}: {reason}")


def cookiecutter_command() -> str:
    """How to start the cookiecutter that is running this hook, from the user's shell."""
    # Hooks run with cookiecutter's own interpreter; its script sits beside it.
    script = Path(sys.executable).parent / "cookiecutter"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m cookiecutter"
    on_path = shutil.which("cookiecutter")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "cookiecutter"
    return shlex.quote(str(script))


def as_extra_context(value) -> str | None:
    """An answer as cookiecutter's KEY=VALUE argument takes it, or None if it cannot be."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    value = str(value)
    # cookiecutter renders the defaults it shows with Jinja: keep braces literal.
    if any(tag in value for tag in JINJA_TAGS):
        if "endraw" in value:
            return None  # cannot be kept literal; the question shows its default instead
        value = RAW_START + value + RAW_END
    return value


def default_answer(raw, context: dict):
    """What cookiecutter offers for a question when nothing is typed, given the other answers."""
    if isinstance(raw, list):
        return raw[0]
    if isinstance(raw, str) and any(tag in raw for tag in JINJA_TAGS):
        try:  # hooks run with cookiecutter's own interpreter
            from cookiecutter.environment import StrictEnvironment
        except ImportError:
            return None  # cannot tell: the answer is kept
        return StrictEnvironment().from_string(raw).render(cookiecutter=context)
    return raw


def rerun_command(context: dict, question: str) -> str | None:
    """The command that asks every question again, each answer but `question`'s kept as the default.

    An answer that is what the template offers anyway (its default, or what
    it derives from the other answers, like service_slug from service_name)
    is left out, so the command shows what was really chosen, and an answer
    derived from the refused one (resource_plural) is derived again.
    """
    questions_file = template_dir() / "cookiecutter.json"
    if not questions_file.exists():
        return None
    raw = json.loads(questions_file.read_text(encoding="utf-8"))
    arguments = []
    for key, default in raw.items():
        if key.startswith("_") or key == question or context.get(key) == default_answer(default, context):
            continue
        text = as_extra_context(context.get(key))
        if text is not None:
            arguments.append(shlex.quote(f"{key}={text}"))
    options = []
    output_dir = context.get("_output_dir")
    if output_dir and Path(output_dir) != Path(os.environ.get("PWD", os.getcwd())):
        options += ["--output-dir", shlex.quote(output_dir)]
    if context.get("_checkout"):
        options += ["--checkout", shlex.quote(context["_checkout"])]
    return " ".join([cookiecutter_command(), *options, shlex.quote(context["_template"]), *arguments])


def main() -> int:
    context = json.loads(RENDERED_CONTEXT)
    try:
        validate(context, load_feature_table())
    except BadAnswer as error:
        print(f"ERROR: {error}", file=sys.stderr)
        command = rerun_command(context, error.question)
        if command:
            print("Ask again, with every other answer kept as the default (Enter keeps it):", file=sys.stderr)
            print(f"    {command}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
