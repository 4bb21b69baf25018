"""The question flow never asks a question whose answer cannot matter.

cookiecutter's own prompting (`prompt_for_config`, as `cookiecutter` and
`make generate` run it) is driven programmatically: every question it asks
and every option it offers is recorded. Then, for every combination of the
answers given before a question, the question must still be open: at least
two of its offered answers lead to generations the template accepts, and to
different projects. `use_kubernetes` asked after `database = sqlite` (only
"no" is accepted) and an outbox transport asked after "no outbox" (every
answer gives the same project) are the two ways this used to fail.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import sys
from collections import defaultdict

import pytest
from cookiecutter import prompt
from cookiecutter.generate import generate_context

from tests.combinations import TEMPLATE, all_combinations, cookiecutter_json, feature_table


def drive_prompts(answers: dict) -> list[tuple[str, list]]:
    """Run cookiecutter's prompting, choosing `answers` where given (defaults elsewhere).

    Returns the questions asked with a fixed set of answers (toggles and
    choices), in order, each with the answers it offered.
    """
    asked: list[tuple[str, list]] = []

    def yes_no(key, default, prompts=None, prefix=""):
        asked.append((key, [True, False]))
        return answers.get(key, default)

    def choice(key, options, prompts=None, prefix=""):
        asked.append((key, list(options)))
        return answers.get(key, options[0])

    def variable(key, default, prompts=None, prefix=""):
        return default

    context = generate_context(
        context_file=str(TEMPLATE / "cookiecutter.json"), default_context={}, extra_context={}
    )
    patches = {"read_user_yes_no": yes_no, "read_user_choice": choice, "read_user_variable": variable}
    originals = {name: getattr(prompt, name) for name in patches}
    sys.path.insert(0, str(TEMPLATE))  # cookiecutter does this for local_extensions
    try:
        for name, function in patches.items():
            setattr(prompt, name, function)
        prompt.prompt_for_config(copy.deepcopy(context), no_input=False)
    finally:
        for name, function in originals.items():
            setattr(prompt, name, function)
        sys.path.remove(str(TEMPLATE))
    return asked


def answers_shaping_prompts() -> set[str]:
    """Questions whose answer a later question's wording, default or options is rendered from.

    cookiecutter renders each question's raw value with the answers given so
    far; only answers named there can change what is asked later.
    """
    raw = cookiecutter_json()
    keys = list(raw)
    shaping = set()
    for index, key in enumerate(keys):
        later = json.dumps([raw[other] for other in keys[index + 1 :]])
        if re.search(rf"cookiecutter\.{re.escape(key)}\b", later):
            shaping.add(key)
    return shaping


def every_flow() -> list[list[tuple[str, list]]]:
    """Every distinct sequence of questions and offered answers cookiecutter can ask.

    The prompts are driven once per combination of the fixed-choice answers
    that later prompts are rendered from (none today, so one flow).
    """
    questions = dict(drive_prompts({}))
    shaping = sorted(key for key in answers_shaping_prompts() if key in questions)
    flows = []
    for values in itertools.product(*(questions[key] for key in shaping)):
        flow = drive_prompts(dict(zip(shaping, values, strict=True)))
        if flow not in flows:
            flows.append(flow)
    return flows


def accepted_projects() -> list[dict]:
    """Every accepted answer combination (python_version included), with the project it gives."""
    table = feature_table()
    projects = []
    for answers in all_combinations():
        for python in cookiecutter_json()["python_version"]:
            full = {**answers, "python_version": python}
            features = tuple(feature.name for feature in table.enabled_features(full))
            projects.append({**full, "_project": (python, features)})
    return projects


def inapplicable_questions(flow: list[tuple[str, list]], projects: list[dict]) -> list[str]:
    """Each (earlier answers, question) where the question cannot change the project."""
    problems = []
    groups: dict[tuple, list[dict]] = {(): projects}
    for key, offered in flow:
        next_groups: dict[tuple, list[dict]] = {}
        for earlier, members in groups.items():
            reachable = defaultdict(set)
            for project in members:
                reachable[project[key]].add(project["_project"])
                next_groups.setdefault(earlier + ((key, project[key]),), []).append(project)
            accepted = [value for value in offered if reachable[value]]
            outcomes = {frozenset(reachable[value]) for value in accepted}
            if len(outcomes) < 2:
                shown = ", ".join(f"{name} = {value!r}" for name, value in earlier) or "no answers"
                why = f"only {accepted!r} can be chosen" if len(accepted) < 2 else f"{accepted!r} all give the same projects"
                problems.append(f"{key} is asked after {shown}, but {why}")
        groups = next_groups
    return problems


def test_every_matrix_question_is_asked():
    """The driven prompts really are cookiecutter's: every toggle and choice is asked, in cookiecutter.json order."""
    flow = drive_prompts({})
    raw = cookiecutter_json()
    expected = [key for key, value in raw.items() if not key.startswith("_") and isinstance(value, (bool, list))]
    assert [key for key, _ in flow] == expected
    assert dict(flow)["database"] == raw["database"]


def test_no_question_is_asked_when_its_answer_cannot_matter():
    """Whatever was answered before, each question still has two answers giving different accepted projects."""
    projects = accepted_projects()
    flows = every_flow()
    assert flows
    problems = [problem for flow in flows for problem in inapplicable_questions(flow, projects)]
    assert problems == [], "\n".join(problems[:10])


@pytest.mark.parametrize(
    ("flow", "expected"),
    [
        (
            [("database", ["postgresql", "mysql", "sqlite"]), ("use_kubernetes", [True, False])],
            "use_kubernetes is asked after database = 'sqlite', but only [False] can be chosen",
        ),
        (
            [("outbox", ["rabbitmq", "in_process", "none"]), ("outbox", ["rabbitmq", "in_process", "none"])],
            "outbox is asked after outbox = 'rabbitmq', but only ['rabbitmq'] can be chosen",
        ),
    ],
    ids=["kubernetes-after-sqlite", "asked-twice"],
)
def test_the_check_catches_an_inapplicable_question(flow, expected):
    """The check is real: the order this template used to have, and a repeated question, are caught."""
    problems = inapplicable_questions(flow, accepted_projects())
    assert any(problem.startswith(expected) for problem in problems), problems


def test_the_check_catches_a_question_whose_answers_give_the_same_project():
    """The other way a question can be pointless (an outbox transport after "no outbox"): every answer, one project."""
    projects = [
        {"use_outbox": True, "transport": "rabbitmq", "_project": "rabbitmq relay"},
        {"use_outbox": True, "transport": "in_process", "_project": "in-process relay"},
        {"use_outbox": False, "transport": "rabbitmq", "_project": "no outbox"},
        {"use_outbox": False, "transport": "in_process", "_project": "no outbox"},
    ]
    flow = [("use_outbox", [True, False]), ("transport", ["rabbitmq", "in_process"])]
    assert inapplicable_questions(flow, projects) == [
        "transport is asked after use_outbox = False, but ['rabbitmq', 'in_process'] all give the same projects"
    ]
