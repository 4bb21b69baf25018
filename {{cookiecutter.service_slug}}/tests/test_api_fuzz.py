"""API fuzzing: schemathesis sends requests generated from the service's own OpenAPI document.

Valid and deliberately invalid requests go to every operation in
/api/openapi.json, in-process over WSGI. Whatever they contain, the service
must never answer 5xx, every answer must match the document (status, content
type, body schema) and every error must be in the JSON error shape. The
number of examples is bounded and derandomised, so the run is fast and
repeatable; set FUZZ_EXAMPLES higher locally for a deeper search.

Schemathesis' Python API is used with Hypothesis' @given directly (one test
covering every operation), rather than its pytest plugin's lazy fixture
loader, which does not work with pytest 9.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

logger = logging.getLogger(__name__)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # per operation and mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def assert_error_shape(label: str, status: int, content: bytes) -> None:
    body = json.loads(content)
    assert set(body) == {"error"}, (label, body)
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, (label, error)
    assert isinstance(error["code"], str), (label, error)
    assert error["code"], (label, error)
    assert isinstance(error["message"], str), (label, error)
    assert isinstance(error["details"], dict), (label, error)
    assert status < 500, (label, error)


def fuzzer(strategy, label: str, cases: dict[str, int]):
    """A Hypothesis test sending every case `strategy` draws and checking the answer."""

    @FUZZ_SETTINGS
    @given(case=strategy)
    def fuzz(case):
        cases[label] = cases.get(label, 0) + 1
        response = case.call_and_validate(checks=CHECKS)
        if response.status_code >= 400:
            assert_error_shape(label, response.status_code, response.content)

    return fuzz


# Background threads of other tests (retry jitter) may touch the global random
# module while Hypothesis draws, which it reports as a deprecation; it does not
# affect what is generated here.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_api_survives_fuzzing(app):
    """Generated requests never get a 5xx, answers conform to the OpenAPI document and errors are JSON-shaped."""
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the OpenAPI document lists no operations"
    cases: dict[str, int] = {}

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} ({mode.value})"
            fuzzer(operation.as_strategy(generation_mode=mode), label, cases)()

    logger.info("fuzzing sent %d cases to %d operations", sum(cases.values()), len(operations))
    # Every operation was exercised both ways, not skipped by the generator.
    assert len(cases) == 2 * len(operations), sorted(cases)
