"""Every accepted combination rendered once, its files kept by content.

`render_matrix` renders each combination in this process (tests/rendering.py)
and interns every file's bytes by SHA-256, so identical files are stored once
and each distinct (path, content) can be checked once for all the
combinations that contain it. `Matrix.where` names the combinations behind a
finding, so a failure reads "config.py:12: ... (from postgresql-..., and 95 more)".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.combinations import combination_id
from tests.rendering import Project, Refused, Renderer

#: Files that configure ruff; each project is linted with its own.
RUFF_CONFIGS = ("pyproject.toml", "ruff.toml", ".ruff.toml")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Matrix:
    """The rendered combinations, and each distinct (path, content) with who has it."""

    projects: list[Project] = field(default_factory=list)
    refused: list[tuple[dict, str]] = field(default_factory=list)
    #: (path, digest) -> indexes into projects
    holders: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    contents: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, project: Project) -> None:
        index = len(self.projects)
        for path, data in project.files.items():
            key = digest(data)
            # One bytes object per distinct content, however many projects share it.
            project.files[path] = self.contents.setdefault(key, data)
            self.holders[(path, key)].append(index)
        self.projects.append(project)

    def where(self, indexes: list[int], limit: int = 2) -> str:
        names = [combination_id(self.projects[i].answers) for i in indexes[:limit]]
        more = len(indexes) - len(names)
        return ", ".join(names) + (f" and {more} more" if more else "")

    def distinct_files(self) -> dict[tuple[str, str], bytes]:
        return {key: self.contents[key[1]] for key in self.holders}


def render_matrix(combinations: list[dict], renderer: Renderer | None = None) -> Matrix:
    """Render each combination once; answers the pre-generation hook refuses are recorded, not rendered."""
    renderer = renderer or Renderer()
    matrix = Matrix()
    started = time.perf_counter()
    for answers in combinations:
        try:
            matrix.add(renderer.render(answers))
        except Refused as refusal:
            matrix.refused.append((answers, str(refusal)))
    matrix.seconds = time.perf_counter() - started
    return matrix


def check_contents(matrix: Matrix, checks: dict) -> dict[str, list[str]]:
    """Run each content check once per distinct (path, content); problems name their combinations."""
    problems: dict[str, list[str]] = {name: [] for name in checks}
    for (path, key), indexes in matrix.holders.items():
        data = matrix.contents[key]
        for name, check in checks.items():
            for problem in check(path, data):
                problems[name].append(f"{problem} (from {matrix.where(indexes)})")
    return problems


def check_projects(matrix: Matrix, checks: dict) -> dict[str, list[str]]:
    """Run each whole-project check on every project; identical findings are grouped."""
    found: dict[str, dict[str, list[int]]] = {name: defaultdict(list) for name in checks}
    for index, project in enumerate(matrix.projects):
        for name, check in checks.items():
            for problem in check(project):
                found[name][problem].append(index)
    return {
        name: [f"{problem} (from {matrix.where(indexes)})" for problem, indexes in problems.items()]
        for name, problems in found.items()
    }


# --- ruff, once over every distinct Python file -------------------------------------------


def ruff_context(project: Project) -> str:
    """What, besides a file's own path and content, decides ruff's verdict on it.

    Its configuration files, the project's top-level names and its packages
    (ruff calls a module first-party when the project root has a package or
    .py file of that name, and finds a file's package by its __init__.py files).
    """
    configs = {path: digest(data) for path, data in project.files.items() if PurePosixPath(path).name in RUFF_CONFIGS}
    top = sorted({PurePosixPath(path).parts[0] + ("/" if "/" in path else "") for path in project.files})
    packages = sorted(path for path in project.files if PurePosixPath(path).name == "__init__.py")
    return digest(json.dumps([configs, top, packages]).encode())


@dataclass
class RuffLayout:
    """Distinct Python files written as a few stand-in projects, each with the real configuration."""

    root: Path
    #: written file -> (path in the project, digest, projects holding it)
    origin: dict[str, tuple[str, str, list[int]]] = field(default_factory=dict)
    checked: set[tuple[str, str, str]] = field(default_factory=set)  # (context, path, digest)


def write_ruff_layers(matrix: Matrix, root: Path) -> RuffLayout:
    """Lay every distinct Python file out so that one ruff run lints each in its project's context.

    Projects with the same ruff context share stand-ins ("layers"): layer n
    holds, for each path, its n-th distinct content; every layer also gets the
    configuration files and the top-level folders and modules first-party
    detection looks for.
    """
    root = Path(os.path.realpath(root))
    layout = RuffLayout(root)
    groups: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(lambda: defaultdict(dict))
    examples: dict[str, Project] = {}
    for index, project in enumerate(matrix.projects):
        context = ruff_context(project)
        examples.setdefault(context, project)
        for path, data in project.files.items():
            if path.endswith(".py") or PurePosixPath(path).name in RUFF_CONFIGS:
                groups[context][path].setdefault(digest(data), []).append(index)
    for group_number, (context, paths) in enumerate(groups.items()):
        example = examples[context]
        configs = {path: data for path, data in example.files.items() if PurePosixPath(path).name in RUFF_CONFIGS}
        top_folders = {PurePosixPath(path).parts[0] for path in example.files if "/" in path}
        top_modules = {path for path in example.files if "/" not in path and path.endswith(".py")}
        packages = {path for path in example.files if PurePosixPath(path).name == "__init__.py"}
        layers = max(len(versions) for path, versions in paths.items() if path.endswith(".py"))
        for layer in range(layers):
            base = root / f"g{group_number}" / f"l{layer}"
            for folder in top_folders:
                (base / folder).mkdir(parents=True, exist_ok=True)
            for path, data in configs.items():
                (base / path).parent.mkdir(parents=True, exist_ok=True)
                (base / path).write_bytes(data)
            for module in top_modules | packages:
                # Empty stand-ins for first-party and package detection; overwritten
                # below where this layer lints that file.
                (base / module).parent.mkdir(parents=True, exist_ok=True)
                (base / module).touch()
        for path, versions in paths.items():
            if not path.endswith(".py"):
                continue
            for layer, (key, indexes) in enumerate(versions.items()):
                target = root / f"g{group_number}" / f"l{layer}" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(matrix.contents[key])
                layout.origin[str(target)] = (path, key, indexes)
                layout.checked.add((context, path, key))
    return layout


def ruff_problems(matrix: Matrix, root: Path) -> tuple[list[str], RuffLayout]:
    layout = write_ruff_layers(matrix, root)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json", "--exit-zero", str(root)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    if result.returncode != 0:
        return [f"ruff failed to run: {result.stderr}"], layout
    problems = []
    for finding in json.loads(result.stdout):
        filename = os.path.realpath(finding["filename"])
        origin = layout.origin.get(filename)
        if origin is None:
            # A stand-in module written only for first-party detection is empty and passes.
            problems.append(f"{filename}: {finding['code']} {finding['message']} (a stand-in file?)")
            continue
        path, _, indexes = origin
        row = finding["location"]["row"]
        problems.append(f"{path}:{row}: {finding['code']} {finding['message']} (from {matrix.where(indexes)})")
    return problems, layout


def linted_everywhere(matrix: Matrix, layout: RuffLayout) -> list[str]:
    """Every Python file of every project was linted in that project's context (none skipped)."""
    missing = []
    for project in matrix.projects:
        context = ruff_context(project)
        for path, data in project.files.items():
            if path.endswith(".py") and (context, path, digest(data)) not in layout.checked:
                missing.append(f"{path} of {combination_id(project.answers)} was not linted")
    return missing


# --- import-linter, once per distinct set of layered code --------------------------------------

#: The packages each project's import contracts cover ([tool.importlinter] in its pyproject.toml).
LAYERED_PACKAGES = ("app/", "common_utils/")


def import_contract_problems(projects: list[Project], root: Path) -> list[str]:
    """`lint-imports` with each project's own contracts; projects with the same code are checked once.

    Only pyproject.toml and the Python files of the layered packages decide
    the verdict, so those are written (once per distinct set) and checked;
    the answer names the combinations that share a broken set.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, project in enumerate(projects):
        files = tuple(
            sorted(
                (path, digest(data))
                for path, data in project.files.items()
                if path == "pyproject.toml" or (path.startswith(LAYERED_PACKAGES) and path.endswith(".py"))
            )
        )
        groups[files].append(index)
    lint_imports = Path(sys.executable).with_name("lint-imports")
    problems = []
    for number, (files, indexes) in enumerate(groups.items()):
        folder = root / f"layers-{number}"
        project = projects[indexes[0]]
        for path, _ in files:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(project.files[path])
        result = subprocess.run(
            [str(lint_imports), "--no-logo", "--no-cache"], cwd=folder, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            names = [combination_id(projects[i].answers) for i in indexes[:2]]
            more = f" and {len(indexes) - 2} more" if len(indexes) > 2 else ""
            broken = result.stdout[result.stdout.find("Broken contracts") :] or result.stdout + result.stderr
            problems.append(f"{', '.join(names)}{more}: {broken.strip()}")
    return problems
