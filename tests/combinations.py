"""The answer combinations the template's tests render.

Everything is derived from cookiecutter.json and the post-generation hook's
feature table, so a new toggle or choice is covered without touching the tests.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
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


def answer_pairs(answers: dict, keys: list[str]) -> set:
    return {((a, answers[a]), (b, answers[b])) for a, b in itertools.combinations(keys, 2)}


def extremes() -> list[dict]:
    """All-on and all-off for each database (made possible: Kubernetes is off with SQLite)."""
    questions = matrix_questions()
    chosen: list[dict] = []
    for database in questions.get("database", [None]):
        for value in (True, False):
            extreme = {key: extreme_answer(values, value) for key, values in questions.items()}
            if database is not None:
                extreme["database"] = database
            if make_possible(extreme) not in chosen:
                chosen.append(make_possible(extreme))
    return chosen


@cache
def covering_set() -> list[dict]:
    """Every pair of answer values at least once, plus all-on and all-off per database.

    Each project here costs a whole generated test suite in CI, so the set is
    kept small: a greedy pass (take the combination covering the most pairs not
    yet covered) gives a first set, then a seeded local search tries to do the
    same with one combination fewer, until it cannot. Deterministic.
    """
    keys = list(matrix_questions())
    candidates = all_combinations()
    chosen = extremes()
    needed = set().union(*(answer_pairs(c, keys) for c in candidates))
    needed -= set().union(*(answer_pairs(c, keys) for c in chosen))

    extra: list[dict] = []
    uncovered = set(needed)
    while uncovered:
        best = max(candidates, key=lambda c: len(answer_pairs(c, keys) & uncovered))
        extra.append(best)
        uncovered -= answer_pairs(best, keys)
    rng = random.Random(14)
    while extra:
        smaller = smaller_cover(candidates, keys, needed, len(extra) - 1, rng)
        if smaller is None:
            break
        extra = smaller
    return chosen + [answers for answers in extra if answers not in chosen]


def smaller_cover(candidates: list[dict], keys: list[str], needed: set, size: int, rng, restarts: int = 8):
    """`size` candidates covering every needed pair, by simulated annealing; None if none found."""
    pairs = [answer_pairs(c, keys) & needed for c in candidates]
    for _ in range(restarts):
        selection = [rng.randrange(len(candidates)) for _ in range(size)]
        count: dict = {}
        for index in selection:
            for pair in pairs[index]:
                count[pair] = count.get(pair, 0) + 1
        uncovered = len(needed) - len(count)
        temperature = 2.0
        for _ in range(30000):
            if uncovered == 0:
                return [candidates[index] for index in sorted(set(selection))] if len(set(selection)) == size else None
            slot, new = rng.randrange(size), rng.randrange(len(candidates))
            old = selection[slot]
            lost = sum(1 for pair in pairs[old] - pairs[new] if count[pair] == 1)
            gained = sum(1 for pair in pairs[new] - pairs[old] if count.get(pair, 0) == 0)
            delta = lost - gained
            if delta <= 0 or rng.random() < math.exp(-delta / temperature):
                for pair in pairs[old]:
                    count[pair] -= 1
                    if count[pair] == 0:
                        del count[pair]
                for pair in pairs[new]:
                    count[pair] = count.get(pair, 0) + 1
                selection[slot] = new
                uncovered = len(needed) - len(count)
            temperature = max(0.05, temperature * 0.9997)
    return None


def generated_suites() -> list[dict]:
    """The covering set as the generated-suite runs: each with the Python version it is tested on.

    3.12 (the default) for most; each other offered version on one of the
    combinations the pairwise search added, so every version runs a suite.
    """
    versions = cookiecutter_json()["python_version"]
    covering = covering_set()
    fixed = len(extremes())
    suites = []
    for index, answers in enumerate(covering):
        extra_index = index - fixed
        version = versions[1 + extra_index] if 0 <= extra_index < len(versions) - 1 else versions[0]
        suites.append({**answers, "python_version": version})
    return suites
