"""Readiness checks that features contribute to /health/ready.

Each feature registers a check with `add_readiness_check(app, name, check)`
from its own `init_app`; the readiness endpoint runs them all. A check
returns a dict of details and raises when its dependency is not usable. A
non-critical check (say, the service registry) is reported but never makes
the service "not ready": the service degrades instead of dying.

Probes time out (Kubernetes after 3 s, Consul after SERVICE_CHECK_TIMEOUT),
and a probe that times out counts as a failure whatever the service would
have said. So the checks run at the same time, each on a thread of its own,
under one budget (READINESS_TIMEOUT seconds): a check still running then is
reported down with the code "timeout" and left to finish in the background;
it is not started again while it runs, so a hung dependency holds one thread,
not one per probe. The answer is cached for READINESS_CACHE_TTL seconds, so
probes from several places cost one round of checks.

The body says which check is up or down with a code ("timeout",
"check_failed"), never the error itself, which may name hosts or carry a
driver's message: that goes to the log, with the request id, when a check
goes down (and once more when it is back up), not at every probe.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Flask

EXTENSION_KEY = "readiness_checks"
RUNNER_KEY = "readiness"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadinessCheck:
    name: str
    check: Callable[[], dict | None]
    critical: bool = True


@dataclass
class CheckRun:
    """One run of one check, on a daemon thread: a hung check must not hold up process exit."""

    check: ReadinessCheck
    app: Flask
    done: threading.Event = field(default_factory=threading.Event)
    details: dict | None = None
    error: Exception | None = None
    duration_ms: float = 0.0

    def start(self) -> CheckRun:
        # The probe's context goes along (tracing's "not traced" for probes, the current span).
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._run,), name=f"readiness-{self.check.name}", daemon=True).start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            with self.app.app_context():
                self.details = self.check.check() or {}
        except Exception as error:  # a failing dependency must not fail the probe itself
            self.error = error
        finally:
            self.duration_ms = round((time.perf_counter() - started) * 1000, 1)
            self.done.set()


class Readiness:
    """Runs an app's checks concurrently under one budget and caches the answer briefly."""

    def __init__(self, app: Flask, budget: float, cache_ttl: float, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.budget = budget
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, CheckRun] = {}
        self._cached: tuple[float, bool, dict] | None = None
        self._down: set[str] = set()

    def run(self) -> tuple[bool, dict]:
        """(ready, results by check name); ready unless a critical check is down."""
        now = self.clock()
        with self._lock:
            if self._cached is not None and now < self._cached[0]:
                return self._cached[1], self._cached[2]
            runs = {name: self._run_of(check) for name, check in self.app.extensions.get(EXTENSION_KEY, {}).items()}
        deadline = time.monotonic() + self.budget
        for run in runs.values():
            run.done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            results = {name: self._result(run) for name, run in runs.items()}
            ready = all(result["status"] == "up" for result in results.values() if result["critical"])
            self._cached = (self.clock() + self.cache_ttl, ready, results)
        return ready, results

    def _run_of(self, check: ReadinessCheck) -> CheckRun:
        """The check's run still in progress (a hung one), else a new one."""
        run = self._runs.get(check.name)
        if run is None or run.done.is_set():
            run = self._runs[check.name] = CheckRun(check, self.app).start()
        return run

    def _result(self, run: CheckRun) -> dict:
        check = run.check
        if not run.done.is_set():
            self._went_down(check, f"no answer within the {self.budget:.2f} s readiness budget")
            return {"status": "down", "critical": check.critical, "error": "timeout"}
        result = {"status": "up", "critical": check.critical, "duration_ms": run.duration_ms}
        if run.error is not None:
            self._went_down(check, f"{type(run.error).__name__}: {run.error}")
            return {**result, "status": "down", "error": "check_failed"}
        if check.name in self._down:
            self._down.discard(check.name)
            logger.info("Readiness check %s is up again", check.name)
        return {**result, **run.details}

    def _went_down(self, check: ReadinessCheck, reason: str) -> None:
        """Log why a check is down, when it goes down; later probes would only repeat it."""
        log = logger.debug if check.name in self._down else logger.warning
        self._down.add(check.name)
        log("Readiness check %s is down (%s): %s", check.name, "critical" if check.critical else "non-critical", reason)


def add_readiness_check(
    app: Flask, name: str, check: Callable[[], dict | None], *, critical: bool = True
) -> None:
    checks = app.extensions.setdefault(EXTENSION_KEY, {})
    checks[name] = ReadinessCheck(name, check, critical)


def readiness(app: Flask) -> Readiness:
    """The app's runner, made at first use (in the serving process, after any fork)."""
    app = getattr(app, "_get_current_object", lambda: app)()  # the checks' threads need the app, not current_app
    runner = app.extensions.get(RUNNER_KEY)
    if runner is None:
        runner = app.extensions.setdefault(
            RUNNER_KEY, Readiness(app, app.config["READINESS_TIMEOUT"], app.config["READINESS_CACHE_TTL"])
        )
    return runner


def run_readiness_checks(app: Flask) -> tuple[bool, dict]:
    """Run every registered check (see Readiness); ready unless a critical one is down."""
    return readiness(app).run()
