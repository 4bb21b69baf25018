"""Checks of one file's content, run once per distinct (path, content) of the matrix.

Across every combination there are only a few thousand distinct files (most
combinations share most files byte for byte), so each check below runs once
per distinct file and its verdict applies to every combination holding it.
Each function returns a list of problems (empty: the file passes), so the
template's own tests can show that a broken file is caught.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import tomllib
from pathlib import PurePosixPath

import yaml
from packaging.requirements import InvalidRequirement, Requirement

#: A Jinja tag or the word cookiecutter left in a generated file (the pinned package
#: `make update` installs, `cookiecutter==...`, is not residue; nor is a GitHub Actions
#: expression, `${{ job.services.rabbitmq.id }}`, which the template writes on purpose).
RESIDUE = re.compile(rb"(?<!\$)\{\{|\{%|\{#|cookiecutter(?!==\d)")
#: cruft's record of the template and the answers: it names cookiecutter by design.
RECORD = ".cruft.json"
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def is_binary(data: bytes) -> bool:
    """Binary by content, not by name: a NUL byte, or not UTF-8."""
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def residue(path: str, data: bytes) -> list[str]:
    """No Jinja tag and no `cookiecutter`, in any file whatever its name (binary ones too)."""
    if PurePosixPath(path).name == RECORD:
        return []
    if is_binary(data):
        return [f"{path}: {match.group().decode(errors='replace')!r} at byte {match.start()}" for match in RESIDUE.finditer(data)]
    return [
        f"{path}:{number}: {line.strip()}"
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1)
        if RESIDUE.search(line.encode())
    ]


def layout(path: str, data: bytes) -> list[str]:
    """Reads as hand-written: a final newline, no trailing whitespace, no blank-line runs."""
    if is_binary(data):
        return []
    text = data.decode("utf-8")
    problems = []
    if text and not text.endswith("\n"):
        problems.append(f"{path}: no newline at the end")
    if text.endswith("\n\n"):
        problems.append(f"{path}: blank lines at the end")
    suffix = PurePosixPath(path).suffix
    limit = 2 if suffix in (".py", ".mako") else 1
    lines = text.splitlines()
    blank_run = 0
    for number, line in enumerate(lines, 1):
        if line != line.rstrip():
            problems.append(f"{path}:{number}: trailing whitespace")
        blank_run = blank_run + 1 if not line.strip() else 0
        if blank_run > limit:
            problems.append(f"{path}:{number}: {blank_run} blank lines in a row")
        if suffix == ".py" and blank_run == 2 and number < len(lines) and lines[number].startswith((" ", "\t")):
            problems.append(f"{path}:{number}: 2 blank lines inside a block")
    return problems


def parses(path: str, data: bytes) -> list[str]:
    """Python compiles; YAML, TOML, JSON and INI files parse."""
    suffix = PurePosixPath(path).suffix
    try:
        text = data.decode("utf-8")
        if suffix == ".py":
            compile(text, path, "exec", dont_inherit=True)
        elif suffix in (".yml", ".yaml"):
            list(yaml.load_all(text, Loader=SAFE_LOADER))
        elif suffix == ".toml":
            tomllib.loads(text)
        elif suffix == ".json":
            json.loads(text)
        elif suffix == ".ini":
            configparser.ConfigParser(interpolation=None).read_string(text)
    except Exception as error:  # SyntaxError, YAMLError, TOMLDecodeError, ...: each is the finding
        return [f"{path}: {type(error).__name__}: {error}"]
    return []


def is_requirements_file(path: str) -> bool:
    name = PurePosixPath(path).name
    return name.startswith("requirements") and name.endswith(".txt")


def requirement_lines(data: bytes) -> list[str]:
    lines = (line.split(" #")[0].strip() for line in data.decode("utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pins(path: str, data: bytes) -> list[str]:
    """Every line of a requirements file pins one exact version (or includes another file)."""
    if not is_requirements_file(path):
        return []
    problems = []
    requirements = []
    for line in requirement_lines(data):
        if line.startswith("-r "):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            problems.append(f"{path}: {line!r} is not a requirement: {error}")
            continue
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            problems.append(f"{path}: {line!r} must pin exactly one version (name==version)")
        requirements.append(requirement)
    if not requirements:
        problems.append(f"{path}: no requirement at all")
    return problems


def is_test_module(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return "tests" in parts[:-1] and parts[-1].startswith("test_") and parts[-1].endswith(".py")


def count_tests(source: str) -> int:
    """Test functions pytest would collect: module-level test_* and test_* methods of Test* classes."""
    tree = ast.parse(source)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    count = 0
    for node in tree.body:
        if isinstance(node, functions) and node.name.startswith("test"):
            count += 1
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            count += sum(1 for item in node.body if isinstance(item, functions) and item.name.startswith("test"))
    return count


def has_tests(path: str, data: bytes) -> list[str]:
    """A tests/test_*.py file defines at least one test (an empty render would pass silently)."""
    if not is_test_module(path):
        return []
    try:
        if count_tests(data.decode("utf-8")) == 0:
            return [f"{path}: defines no test"]
    except SyntaxError:
        return []  # parses() reports it
    return []


#: Every check of one file, by name; the matrix runs each on every distinct (path, content).
CONTENT_CHECKS = {
    "residue": residue,
    "layout": layout,
    "parses": parses,
    "pins": pins,
    "has_tests": has_tests,
}
