"""Fixtures for the template's own tests.

The matrix tests share one rendered project per answer combination: the
`project` fixture is session-scoped and parametrized, and every test of one
combination is kept on one xdist worker (`--dist loadgroup`), so each
combination is rendered once and removed when its tests are done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.combinations import TEMPLATE, combination_id, feature_table

#: CI sets this: a test whose real service or tool is missing fails instead of skipping.
IN_CI = bool(os.environ.get("CI"))


def fail_or_skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so a missing dependency is an error)")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    """Keep all tests of one rendered combination on one worker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "project" in callspec.params:
            item.add_marker(pytest.mark.xdist_group(f"combo-{callspec.id.split('[')[0]}"))


@pytest.fixture(scope="session")
def table():
    """The post-generation hook's feature table (the only list of feature files)."""
    return feature_table()


class Baked:
    """A rendered project and the answers that made it."""

    def __init__(self, path: Path, context: dict):
        self.path = path
        self.context = context

    def files(self, suffixes: tuple[str, ...] = ()) -> list[Path]:
        return sorted(
            p
            for p in self.path.rglob("*")
            if p.is_file() and (not suffixes or p.suffix in suffixes or p.name in suffixes)
        )


def bake_or_fail(cookies, answers: dict) -> Baked:
    result = cookies.bake(extra_context=answers, template=str(TEMPLATE))
    assert result.exit_code == 0, f"rendering {answers} failed: {result.exception!r}"
    assert result.exception is None
    return Baked(Path(result.project_path), dict(result.context))


def render_project(request, cookies_session) -> Baked:
    baked = bake_or_fail(cookies_session, request.param)
    request.addfinalizer(lambda: shutil.rmtree(baked.path.parent, ignore_errors=True))
    return baked


def param_ids(combinations: list[dict]) -> list[str]:
    return [combination_id(answers) for answers in combinations]
