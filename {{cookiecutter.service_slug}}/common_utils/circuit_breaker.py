"""Circuit breakers for calls to other services: closed, open, half-open.

The states behave as in Resilience4j:

- closed: calls go through. CIRCUIT_BREAKER_FAILURE_THRESHOLD failures in a
  row open the breaker (a success resets the count).
- open: calls fail at once with CircuitOpenError, without touching the
  network, for CIRCUIT_BREAKER_RECOVERY_TIMEOUT seconds.
- half-open: the first call after that turns the breaker half-open, and
  CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS probe calls are let through while the
  rest still fail fast. A successful probe closes the breaker, a failed one
  opens it again for another recovery timeout.

There is one breaker per downstream service, by name, per app:
`circuit_breakers.get("payments-service")`. Like Resilience4j's, a breaker
lives in one process: each gunicorn worker keeps its own. States are listed in
/health/ready (informational: an open breaker does not make this service
unready) and, with metrics on, exported as `circuit_breaker_state`.

The state machine is purgatory's. What it leaves to its caller is added here:
admitting a call and recording its outcome each happen under a short lock,
so concurrent threads cannot lose a failure or race a state change, and
half-open admits exactly the configured number of probes. The lock is never
held while the protected call runs, so concurrent calls through a closed
breaker run concurrently. (pybreaker was not used for exactly that: its
`call()` holds its lock around the protected call, serialising all callers.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Flask, current_app
from purgatory import SyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from common_utils.health import add_readiness_check

EXTENSION_KEY = "circuit_breakers"
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# purgatory's state names, in the vocabulary of this service (and Resilience4j).
STATE_NAMES = {"closed": CLOSED, "opened": OPEN, "half-opened": HALF_OPEN}
# Numeric values of the circuit_breaker_state gauge: higher is worse, so the
# maximum over gunicorn workers is the state to worry about.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

T = TypeVar("T")


class CircuitOpenError(Exception):
    """The breaker refused the call: the downstream is considered down."""

    def __init__(self, name: str, state: str, retry_after: float):
        self.name = name
        self.state = state
        self.retry_after = max(retry_after, 0.0)
        if state == OPEN:
            reason = f"open, next try in {self.retry_after:.1f} s"
        else:
            reason = "half-open and its probe calls are already under way"
        super().__init__(f"Circuit breaker {name!r} is {reason}")


class BreakerTripped(Exception):
    """Reported by /health/ready while a breaker is open or half-open."""


class CircuitBreaker:
    """One named breaker; `call(func, *args)` runs `func` under its rules.

    Exceptions listed in `exclude` pass through without counting as failures
    (say, a 404 from the downstream: it answered, so it is up).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        exclude: Iterable[type[BaseException]] = (),
        enabled: bool = True,
        factory: SyncCircuitBreakerFactory | None = None,
        on_state_change: Callable[[CircuitBreaker, str], None] | None = None,
    ):
        if failure_threshold < 1 or half_open_max_calls < 1 or recovery_timeout <= 0:
            raise ValueError(
                "a circuit breaker needs failure_threshold >= 1, half_open_max_calls >= 1 "
                "and recovery_timeout > 0"
            )
        self.name = name
        self.enabled = enabled
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self.on_state_change = on_state_change
        self._lock = threading.Lock()
        self._probes = 0  # probes admitted in the current half-open period
        self._half_open_period = 0  # bumped each time the breaker turns half-open
        factory = factory or SyncCircuitBreakerFactory()
        self.exclude = frozenset(exclude)
        self._breaker = factory.get_breaker(
            name, threshold=failure_threshold, ttl=recovery_timeout, exclude=list(self.exclude)
        )
        self._context = self._breaker.context

    @property
    def state(self) -> str:
        return STATE_NAMES[self._context.state]

    @property
    def failure_count(self) -> int:
        return self._context.failure_count or 0

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        opened_at = self._context.opened_at
        if self.state != OPEN or opened_at is None:
            return 0.0
        return max(opened_at + self.recovery_timeout - time.time(), 0.0)

    def snapshot(self) -> dict:
        return {
            "state": self.state,
            "failures": self.failure_count,
            "retry_after_s": round(self.retry_after, 1),
        }

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.enabled:
            return func(*args, **kwargs)
        ticket = self._admit()
        try:
            result = func(*args, **kwargs)
        except Exception as error:
            self._record(ticket, error)
            raise
        except BaseException:  # interrupted (KeyboardInterrupt, SystemExit): no verdict
            self._release(ticket)
            raise
        self._record(ticket, None)
        return result

    def _admit(self) -> tuple[bool, int]:
        """Let a call in or raise CircuitOpenError; returns (is_probe, half-open period)."""
        with self._lock:
            before = self.state
            try:
                self._context.handle_new_request()
            except OpenedState:
                raise CircuitOpenError(self.name, OPEN, self.retry_after) from None
            finally:
                self._publish(before)
            if self.state != HALF_OPEN:
                return False, self._half_open_period
            if before != HALF_OPEN:
                self._half_open_period += 1
                self._probes = 0
            if self._probes >= self.half_open_max_calls:
                raise CircuitOpenError(self.name, HALF_OPEN, 0.0)
            self._probes += 1
            return True, self._half_open_period

    def _record(self, ticket: tuple[bool, int], error: BaseException | None) -> None:
        is_probe, period = ticket
        with self._lock:
            if self.state == HALF_OPEN and not (is_probe and period == self._half_open_period):
                # A call let in before the breaker opened: only probes decide now.
                return
            before = self.state
            if error is None:
                self._context.handle_end_request()
            else:
                self._context.handle_exception(error)
            self._publish(before)

    def _release(self, ticket: tuple[bool, int]) -> None:
        """Give back an interrupted probe's slot, so half-open cannot wait for it forever."""
        is_probe, period = ticket
        with self._lock:
            if is_probe and period == self._half_open_period and self.state == HALF_OPEN:
                self._probes -= 1

    def _publish(self, before: str) -> None:
        """Hand purgatory's queued events to its bus, then tell our listener of a new state."""
        while self._context.messages:
            self._breaker.messagebus.handle(self._context.messages.pop(0), self._breaker.uow)
        if self.on_state_change is not None and self.state != before:
            self.on_state_change(self, self.state)


@dataclass
class BreakerRegistry:
    """The breakers of one app, created on first use with the app's settings."""

    enabled: bool
    failure_threshold: int
    recovery_timeout: float
    half_open_max_calls: int
    on_state_change: Callable[[CircuitBreaker, str], None] | None = None
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    factory: SyncCircuitBreakerFactory = field(default_factory=SyncCircuitBreakerFactory)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str, exclude: Iterable[type[BaseException]] | None = None) -> CircuitBreaker:
        """The breaker called `name`, created on first use with `exclude` (none when not given).

        One downstream has one breaker, so what counts as its failure is decided
        once: asking again with a different `exclude` is refused rather than
        silently handed the first caller's breaker. Without `exclude` the
        existing breaker is returned as it is.
        """
        wanted = None if exclude is None else frozenset(exclude)
        with self.lock:
            breaker = self.breakers.get(name)
            if breaker is not None and wanted is not None and wanted != breaker.exclude:
                raise ValueError(
                    f"Circuit breaker {name!r} already exists with exclude={describe(breaker.exclude)}; "
                    f"it cannot be used with exclude={describe(wanted)}: use one exclude for one "
                    "downstream, or give the breaker another name"
                )
            if breaker is None:
                breaker = CircuitBreaker(
                    name,
                    failure_threshold=self.failure_threshold,
                    recovery_timeout=self.recovery_timeout,
                    half_open_max_calls=self.half_open_max_calls,
                    exclude=wanted or (),
                    enabled=self.enabled,
                    factory=self.factory,
                    on_state_change=self.on_state_change,
                )
                self.breakers[name] = breaker
                if self.on_state_change is not None:
                    self.on_state_change(breaker, breaker.state)
            return breaker

    def readiness(self) -> dict:
        """Every breaker's state; raises (reported, never fatal) when one is not closed."""
        states = {name: breaker.snapshot() for name, breaker in sorted(self.breakers.items())}
        tripped = [
            f"{name} is {info['state']}" + (f" (next try in {info['retry_after_s']} s)" if info["retry_after_s"] else "")
            for name, info in states.items()
            if info["state"] != CLOSED
        ]
        if tripped:
            raise BreakerTripped("; ".join(tripped))
        return {"breakers": states}


class CircuitBreakers:
    """The extension: `circuit_breakers.get(name)` is that downstream's breaker in this app.

    Call init_app after the metrics extension, whose registry receives the
    breaker state gauge.
    """

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> BreakerRegistry:
        registry = BreakerRegistry(
            enabled=app.config.get("CIRCUIT_BREAKER_ENABLED", True),
            failure_threshold=app.config.get("CIRCUIT_BREAKER_FAILURE_THRESHOLD", 5),
            recovery_timeout=app.config.get("CIRCUIT_BREAKER_RECOVERY_TIMEOUT", 30.0),
            half_open_max_calls=app.config.get("CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS", 1),
            on_state_change=state_gauge(app),
        )
        app.extensions[EXTENSION_KEY] = registry
        add_readiness_check(app, "circuit_breakers", registry.readiness, critical=False)
        return registry

    @staticmethod
    def registry(app: Flask | None = None) -> BreakerRegistry:
        return (app or current_app).extensions[EXTENSION_KEY]

    def get(
        self, name: str, app: Flask | None = None, exclude: Iterable[type[BaseException]] | None = None
    ) -> CircuitBreaker:
        return self.registry(app).get(name, exclude)


def describe(exclude: frozenset[type[BaseException]]) -> str:
    return "(" + ", ".join(sorted(kind.__name__ for kind in exclude)) + ")"


def state_gauge(app: Flask) -> Callable[[CircuitBreaker, str], None] | None:
    """A listener that keeps `circuit_breaker_state{name}` current, when metrics are on."""
    exporter = app.extensions.get("metrics")
    if exporter is None:
        return None
    from prometheus_client import Gauge

    gauge = Gauge(
        "circuit_breaker_state",
        "Circuit breaker state per downstream: 0 closed, 1 half-open, 2 open",
        ["name"],
        registry=exporter.registry,
        multiprocess_mode="livemax",  # under gunicorn: the worst state among live workers
    )

    def update(breaker: CircuitBreaker, state: str) -> None:
        gauge.labels(name=breaker.name).set(STATE_VALUES[state])

    return update
