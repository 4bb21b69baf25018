"""Readiness checks that features contribute to /health/ready.

Each feature registers a check with `add_readiness_check(app, name, check)`
from its own `init_app`; the readiness endpoint runs them all. A check
returns a dict of details and raises when its dependency is not usable. A
non-critical check (say, the service registry) is reported but never makes
the service "not ready": the service degrades instead of dying.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask

EXTENSION_KEY = "readiness_checks"


@dataclass(frozen=True)
class ReadinessCheck:
    name: str
    check: Callable[[], dict | None]
    critical: bool = True

    def run(self) -> dict:
        started = time.perf_counter()
        try:
            details = self.check() or {}
            status = "up"
        except Exception as error:  # a failing dependency must not fail the probe itself
            details = {"error": f"{type(error).__name__}: {error}"}
            status = "down"
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        return {"status": status, "critical": self.critical, "duration_ms": elapsed_ms, **details}


def add_readiness_check(
    app: Flask, name: str, check: Callable[[], dict | None], *, critical: bool = True
) -> None:
    checks = app.extensions.setdefault(EXTENSION_KEY, {})
    checks[name] = ReadinessCheck(name, check, critical)


def run_readiness_checks(app: Flask) -> tuple[bool, dict]:
    """Run every registered check; ready unless a critical one is down."""
    results = {name: check.run() for name, check in app.extensions.get(EXTENSION_KEY, {}).items()}
    ready = all(result["status"] == "up" for result in results.values() if result["critical"])
    return ready, results
