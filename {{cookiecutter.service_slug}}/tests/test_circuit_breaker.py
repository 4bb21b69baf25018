"""Circuit breakers: closed / open / half-open, under concurrency, per app."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from common_utils.circuit_breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    CircuitBreakers,
    CircuitOpenError,
)

RECOVERY = 0.2  # seconds; short so the tests can wait it out


class Boom(Exception):
    pass


def fail():
    raise Boom("downstream failed")


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.state == OPEN


def test_concurrent_calls_through_a_closed_breaker_run_concurrently():
    """10 threads each making a 100 ms call through one closed breaker finish in well under 0.3 s."""
    breaker = CircuitBreaker("slow", failure_threshold=5, recovery_timeout=30)
    barrier = threading.Barrier(10)

    def slow_call():
        barrier.wait(timeout=5)
        return breaker.call(time.sleep, 0.1)

    with ThreadPoolExecutor(max_workers=10) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda _: slow_call(), range(10)))
        elapsed = time.perf_counter() - started
    assert results == [None] * 10
    assert breaker.state == CLOSED
    # Serialised calls (a lock held around the call) would take 1 s.
    assert elapsed < 0.3, f"10 concurrent 100 ms calls took {elapsed:.3f} s"


def test_opens_after_threshold_and_fails_fast():
    """After FAILURE_THRESHOLD failures in a row the breaker opens and refuses calls without running them."""
    breaker = CircuitBreaker("payments", failure_threshold=3, recovery_timeout=30)
    trip(breaker)
    calls = []
    with pytest.raises(CircuitOpenError) as refused:
        breaker.call(calls.append, "ran")
    assert calls == []
    assert refused.value.name == "payments"
    assert refused.value.state == OPEN
    assert 29 < refused.value.retry_after <= 30
    assert "'payments' is open" in str(refused.value)


def test_success_resets_the_failure_count():
    """Failures must be consecutive: a success in between starts the count again."""
    breaker = CircuitBreaker("flaky", failure_threshold=3, recovery_timeout=30)
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.call(lambda: "ok") == "ok"
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 2


def test_half_open_probe_success_closes():
    """After the recovery timeout one probe goes through; its success closes the breaker."""
    breaker = CircuitBreaker("users", failure_threshold=2, recovery_timeout=RECOVERY)
    trip(breaker)
    time.sleep(RECOVERY + 0.05)
    assert breaker.call(lambda: "probe ok") == "probe ok"
    assert breaker.state == CLOSED
    assert breaker.failure_count == 0


def test_half_open_probe_failure_reopens():
    """A failed probe opens the breaker again for a whole recovery timeout."""
    breaker = CircuitBreaker("users", failure_threshold=2, recovery_timeout=RECOVERY)
    trip(breaker)
    time.sleep(RECOVERY + 0.05)
    with pytest.raises(Boom):
        breaker.call(fail)
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "too early")
    assert breaker.retry_after > RECOVERY / 2


@pytest.mark.parametrize("max_probes", [1, 3])
def test_half_open_admits_exactly_the_configured_probes_under_concurrency(max_probes):
    """20 threads racing a half-open breaker: exactly HALF_OPEN_MAX_CALLS get through, the rest fail fast."""
    breaker = CircuitBreaker(
        "inventory", failure_threshold=1, recovery_timeout=RECOVERY, half_open_max_calls=max_probes
    )
    trip(breaker)
    time.sleep(RECOVERY + 0.05)
    threads = 20
    barrier = threading.Barrier(threads)
    release = threading.Event()
    admitted = []

    def probe():
        admitted.append(threading.get_ident())
        assert release.wait(timeout=5)
        return "recovered"

    def attempt():
        barrier.wait(timeout=5)
        try:
            return breaker.call(probe)
        except CircuitOpenError as error:
            return error

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(attempt) for _ in range(threads)]
        # Every thread that was refused has returned; the probes are still running.
        deadline = time.monotonic() + 5
        while sum(f.done() for f in futures) < threads - max_probes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert breaker.state == HALF_OPEN
        assert len(admitted) == max_probes
        release.set()
        outcomes = [future.result(timeout=5) for future in futures]
    refused = [o for o in outcomes if isinstance(o, CircuitOpenError)]
    assert outcomes.count("recovered") == max_probes
    assert len(refused) == threads - max_probes
    assert all(error.state == HALF_OPEN for error in refused)
    assert breaker.state == CLOSED


def test_an_interrupted_probe_gives_its_slot_back():
    """A probe stopped by KeyboardInterrupt/SystemExit decides nothing and lets the next call probe."""

    class Interrupted(BaseException):
        pass

    def interrupted():
        raise Interrupted

    breaker = CircuitBreaker("users", failure_threshold=1, recovery_timeout=RECOVERY)
    trip(breaker)
    time.sleep(RECOVERY + 0.05)
    with pytest.raises(Interrupted):
        breaker.call(interrupted)
    assert breaker.state == HALF_OPEN
    assert breaker.call(lambda: "probe ok") == "probe ok"
    assert breaker.state == CLOSED


def test_calls_started_before_opening_do_not_decide_half_open():
    """A slow call admitted while closed and finishing during half-open neither closes nor reopens the breaker."""
    breaker = CircuitBreaker("orders", failure_threshold=1, recovery_timeout=RECOVERY)
    release = threading.Event()

    def slow_success():
        assert release.wait(timeout=5)
        return "late"

    with ThreadPoolExecutor(max_workers=1) as pool:
        late = pool.submit(breaker.call, slow_success)
        time.sleep(0.05)  # the slow call is admitted while closed
        trip(breaker)
        time.sleep(RECOVERY + 0.05)
        probe_release = threading.Event()
        probe_thread = threading.Thread(
            target=lambda: breaker.call(lambda: probe_release.wait(timeout=5))
        )
        probe_thread.start()
        time.sleep(0.05)
        assert breaker.state == HALF_OPEN
        release.set()
        assert late.result(timeout=5) == "late"
        assert breaker.state == HALF_OPEN  # only the probe may decide
        probe_release.set()
        probe_thread.join(timeout=5)
    assert breaker.state == CLOSED


def test_excluded_exceptions_do_not_count_as_failures():
    """An excluded error (say, a 4xx: the downstream answered) passes through without tripping the breaker."""

    class NotFound(Exception):
        pass

    def not_found():
        raise NotFound("no such order")

    breaker = CircuitBreaker("orders", failure_threshold=2, recovery_timeout=30, exclude=[NotFound])
    for _ in range(5):
        with pytest.raises(NotFound):
            breaker.call(not_found)
    assert breaker.state == CLOSED
    assert breaker.failure_count == 0


def test_disabled_breaker_only_passes_calls_through():
    """CIRCUIT_BREAKER_ENABLED=false: failures are returned as they are and nothing ever opens."""
    breaker = CircuitBreaker("off", failure_threshold=1, recovery_timeout=30, enabled=False)
    for _ in range(3):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.state == CLOSED
    assert breaker.call(lambda: 42) == 42


def test_settings_are_validated():
    """A threshold, probe count or recovery timeout that makes no sense is refused at start-up."""
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("bad", failure_threshold=0)
    with pytest.raises(ValueError, match="recovery_timeout"):
        CircuitBreaker("bad", recovery_timeout=0)


def test_one_breaker_per_downstream_with_the_app_settings(make_app):
    """The extension gives one breaker per name, configured from CIRCUIT_BREAKER_*, and apps do not share them."""
    first = make_app(CIRCUIT_BREAKER_FAILURE_THRESHOLD=2, CIRCUIT_BREAKER_RECOVERY_TIMEOUT=7.5)
    second = make_app(CIRCUIT_BREAKER_FAILURE_THRESHOLD=2)
    breakers = CircuitBreakers()
    payments = breakers.get("payments", first)
    assert breakers.get("payments", first) is payments
    assert breakers.get("users", first) is not payments
    assert payments.failure_threshold == 2
    assert payments.recovery_timeout == 7.5
    trip(payments)
    assert breakers.get("payments", second).state == CLOSED


def test_a_breaker_is_not_reused_with_a_different_exclude(make_app):
    """Whoever asks first does not decide what counts as a failure: a conflicting exclude is refused."""

    class NotFound(Exception):
        pass

    app = make_app(CIRCUIT_BREAKER_FAILURE_THRESHOLD=1)
    breakers = CircuitBreakers()
    lenient = breakers.get("inventory", app, exclude=(NotFound,))
    assert breakers.get("inventory", app, exclude=[NotFound]) is lenient  # same set, any iterable
    assert breakers.get("inventory", app) is lenient  # no exclude given: the existing breaker
    with pytest.raises(ValueError, match=r"inventory.*already exists.*NotFound"):
        breakers.get("inventory", app, exclude=())
    with pytest.raises(ValueError, match="inventory"):
        breakers.get("inventory", app, exclude=(Boom,))
    with pytest.raises(NotFound):
        lenient.call(lambda: (_ for _ in ()).throw(NotFound("no such item")))
    assert lenient.state == CLOSED


def test_breakers_are_listed_in_readiness_as_informational(make_app):
    """/health/ready lists every breaker; an open one is reported but leaves the service ready."""
    app = make_app(CIRCUIT_BREAKER_FAILURE_THRESHOLD=1)
    breakers = CircuitBreakers()
    breakers.get("users", app)
    client = app.test_client()
    healthy = client.get("/health/ready").get_json()["checks"]["circuit_breakers"]
    assert healthy["status"] == "up"
    assert healthy["critical"] is False
    assert healthy["breakers"]["users"] == {"state": "closed", "failures": 0, "retry_after_s": 0.0}

    trip(breakers.get("payments", app))
    response = client.get("/health/ready")
    check = response.get_json()["checks"]["circuit_breakers"]
    assert response.status_code == 200
    assert check["status"] == "down"
    assert check["error"] == "check_failed"  # which breaker: in the log
