"""The answer combinations the template's tests render.

Everything is derived from cookiecutter.json and the post-generation hook's
feature table, so a new toggle or choice is covered without touching the tests.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from functools import cache
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent
#: Questions whose every value is exercised elsewhere, not in the full product.
NOT_IN_MATRIX = {"python_version"}


@cache
def cookiecutter_json() -> dict:
    return json.loads((TEMPLATE / "cookiecutter.json").read_text())


@cache
def feature_table():
    """The post-generation hook as a module: FEATURES, COMPOSE_SERVICES, ..."""
    path = TEMPLATE / "hooks" / "post_gen_project.py"
    spec = importlib.util.spec_from_file_location("post_gen_project", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def matrix_questions() -> dict[str, list]:
    """Every question with a fixed set of answers: toggles and choices."""
    options = {}
    for key, value in cookiecutter_json().items():
        if key.startswith("_") or key in NOT_IN_MATRIX:
            continue
        if isinstance(value, bool):
            options[key] = [True, False]
        elif isinstance(value, list):
            options[key] = list(value)
    return options


def defaults() -> dict:
    """What `cookiecutter --no-input` answers to the matrix questions."""
    answers = cookiecutter_json()
    return {key: answers[key] if isinstance(answers[key], bool) else values[0] for key, values in matrix_questions().items()}


def is_possible(answers: dict) -> bool:
    """False for combinations the feature table declares impossible (pre-gen rejects them)."""
    return not feature_table().incompatible_answers(answers)


def product_of_answers() -> list[dict]:
    questions = matrix_questions()
    keys = list(questions)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*questions.values())]


def all_combinations() -> list[dict]:
    """Every combination the template accepts."""
    return [answers for answers in product_of_answers() if is_possible(answers)]


def impossible_combinations() -> list[dict]:
    """Every combination the feature table declares impossible."""
    return [answers for answers in product_of_answers() if not is_possible(answers)]


def make_possible(answers: dict) -> dict:
    """Turn off the features that cannot work with these answers (for "all on")."""
    answers = dict(answers)
    while not is_possible(answers):
        for feature, _, _ in feature_table().incompatible_answers(answers):
            answers.update({key: False for key, value in feature.when.items() if value is True})
    return answers


def combination_id(answers: dict) -> str:
    parts = []
    for key, value in answers.items():
        if isinstance(value, bool):
            parts.append(key.removeprefix("use_") if value else f"no_{key.removeprefix('use_')}")
        else:
            parts.append(str(value))
    return "-".join(parts)


def extreme_answer(values: list, on: bool):
    """A question's answer in the all-on (`on`) or all-off project.

    Toggles take `on`; a choice takes its default, except that all-off takes
    its "none" value when it has one (the outbox question).
    """
    if isinstance(values[0], bool):
        return on
    return "none" if not on and "none" in values else values[0]


def covering_set() -> list[dict]:
    """Every pair of answer values at least once, plus all-on and all-off per database.

    Greedy pairwise construction: repeatedly take the combination that covers
    the most pairs not yet covered. Deterministic, and small (a dozen or so).
    """
    questions = matrix_questions()
    keys = list(questions)
    candidates = all_combinations()

    def pairs(answers: dict) -> set:
        return {
            ((a, answers[a]), (b, answers[b]))
            for a, b in itertools.combinations(keys, 2)
        }

    chosen: list[dict] = []
    databases = questions.get("database", [None])
    for database in databases:
        for value in (True, False):
            extreme = {key: extreme_answer(values, value) for key, values in questions.items()}
            if database is not None:
                extreme["database"] = database
            chosen.append(make_possible(extreme))

    uncovered = set().union(*(pairs(c) for c in candidates)) - set().union(*(pairs(c) for c in chosen))
    while uncovered:
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    unique = []
    for answers in chosen:
        if answers not in unique:
            unique.append(answers)
    return unique
