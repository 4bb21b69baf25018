"""Consul registration and discovery: the guide's ServiceRegistry extension.

Registration belongs to the process that owns the listening socket, not to
each app object. Under gunicorn several workers serve one host:port; if each
registered and deregistered itself, the first worker to be recycled would
take the whole instance out of Consul while its siblings still serve. So:

- under gunicorn the master registers once (`gunicorn_when_ready`) and
  deregisters as soon as it is told to stop (SIGTERM, SIGINT, SIGQUIT),
  before gunicorn closes its sockets and drains the requests in flight:
  discovery stops sending traffic first; workers never register;
- `flask run` registers from `init_app`, in the process that serves;
- `python main.py` calls `register_process(app)` before serving;
- importing the app, the tests and other `flask` commands never register.

Consul being down never stops the service: registration is retried in a
background thread with exponential backoff, the first failure is logged (then
only the recovery), and the state shows in /health/ready as a non-critical
check. Registration is kept, not one-shot: every CONSUL_RESYNC_INTERVAL
seconds the thread asks the agent whether it still knows the instance and
registers it again if not (a restarted `-dev` agent keeps nothing). Consul's
check is /health/ready, so an instance whose database is down leaves
discovery until it is ready again. The instance is deregistered at normal
exit and on SIGTERM.

Discovery: `service_registry.resolve("payments")` returns the base URL of an
instance whose checks pass, round-robin over the healthy instances, from a
list cached for SERVICE_DISCOVERY_CACHE_TTL seconds.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import click
import consul
import requests
from flask import Flask, current_app
from flask.cli import get_debug_flag
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.serving import is_running_from_reloader

from common_utils.health import add_readiness_check

EXTENSION_KEY = "service_registry"
#: First wait after a failed registration; doubled after each failure.
FIRST_RETRY_DELAY = 0.5
#: Seconds a failed discovery lookup is remembered (callers fail fast, or use the last known list).
FAILED_LOOKUP_TTL = 1.0
WILDCARD_ADDRESSES = {"", "0.0.0.0", "::"}
CONSUL_ERRORS = (requests.RequestException, consul.ConsulException)

logger = logging.getLogger(__name__)


class NoHealthyInstanceError(ServiceUnavailable):
    """resolve() has no instance of a service to offer.

    It is a 503 HTTP exception, so a view that lets it escape answers with
    the service's JSON error body (code `dependency_unavailable`), not a 500.
    """

    def __init__(self, service: str, reason: str):
        self.service = service
        super().__init__(description=f"No healthy instance of {service!r}: {reason}")
        self.data = {
            "code": "dependency_unavailable",
            "message": self.description,
            "details": {"service": service},
        }


class NotRegisteredError(RuntimeError):
    """The instance is not (yet) in Consul; shown by the readiness check."""


def default_address() -> str:
    """The address other services should call: this host's IP on its network.

    In a container that is the container's address on the compose network,
    which is what Consul's HTTP check and the callers can reach.
    """
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class Registration:
    """What this instance tells the Consul agent about itself."""

    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: dict[str, str]
    check: dict[str, str]

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, address: str | None = None, port: int | None = None
    ) -> Registration:
        """Build it from the settings; `address`/`port` are what the server really bound."""
        name = config["SERVICE_NAME"]
        address = config.get("SERVICE_ADDRESS") or address or default_address()
        port = int(port or config["SERVICE_PORT"])
        service_id = instance_id(config, port)
        version = config["SERVICE_VERSION"]
        api_versions = [config["API_VERSION"]] if config.get("API_VERSION") else []
        tags = [f"version={version}", *(f"api-{item}" for item in api_versions)]
        tags += [tag for tag in config.get("SERVICE_TAGS", []) if tag not in tags]
        meta = {"version": version, "environment": config.get("ENVIRONMENT", "")}
        if api_versions:
            meta["api_versions"] = ",".join(api_versions)
        host = f"[{address}]" if ":" in address else address
        check = consul.Check.http(
            f"http://{host}:{port}/health/ready",  # not ready (database down): out of discovery
            interval=config["SERVICE_CHECK_INTERVAL"],
            timeout=config["SERVICE_CHECK_TIMEOUT"],
            deregister=config["SERVICE_DEREGISTER_AFTER"],
        )
        return cls(service_id, name, address, port, tuple(tags), meta, check)


def instance_id(config: Mapping[str, Any], port: int | None = None) -> str:
    """SERVICE_ID, or name-hostname-port: unique per instance, stable across restarts."""
    port = int(port or config["SERVICE_PORT"])
    return config.get("SERVICE_ID") or f"{config['SERVICE_NAME']}-{socket.gethostname()}-{port}"


def consul_client(config: Mapping[str, Any]) -> consul.Consul:
    """A py-consul client whose calls give up after CONSUL_TIMEOUT seconds (default is 30)."""
    client = consul.Consul(
        host=config["CONSUL_HOST"],
        port=config["CONSUL_PORT"],
        scheme=config["CONSUL_SCHEME"],
        token=config.get("CONSUL_TOKEN") or None,
    )
    client.http.connections_timeout = config["CONSUL_TIMEOUT"]
    return client


def agent_address(config: Mapping[str, Any]) -> str:
    return f"{config['CONSUL_HOST']}:{config['CONSUL_PORT']}"


class Registrar:
    """Keeps one instance registered with the local Consul agent while this process runs.

    `start()` registers in a background thread, retrying with exponential
    backoff (capped at `max_delay`) until the agent accepts, then checks
    every `resync_interval` seconds that the agent still knows the instance
    and registers it again when it does not; `stop()` deregisters. It only
    acts in the process that created it: a forked gunicorn worker inherits
    the object and its atexit hook, and must not deregister the instance its
    master registered.
    """

    def __init__(
        self,
        client: consul.Consul,
        registration: Registration,
        *,
        agent: str,
        max_delay: float,
        resync_interval: float = 15.0,
    ):
        self.client = client
        self.registration = registration
        self.agent = agent
        self.max_delay = max_delay
        self.resync_interval = resync_interval
        self.registered = False
        self.attempts = 0
        self.last_error: str | None = None
        self._pid = os.getpid()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Held during each attempt; a fork waits for it (see _before_fork), and so does stop().
        self.attempt_lock = threading.Lock()

    @property
    def owned_here(self) -> bool:
        return os.getpid() == self._pid

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep_registered, name="consul-registration", daemon=True)
        self._thread.start()

    def _keep_registered(self) -> None:
        delay = FIRST_RETRY_DELAY
        while not self._stopping.is_set():
            if self._attempt():
                delay, wait = FIRST_RETRY_DELAY, self.resync_interval
            else:
                wait, delay = delay, min(delay * 2, self.max_delay)
            if self._stopping.wait(wait):
                return

    def _attempt(self) -> bool:
        """Register, or check that the agent still knows the instance; False on failure."""
        with self.attempt_lock:
            if self._stopping.is_set():
                return True
            if self.registered and self._still_known():
                return True
            return self.register_once()

    def _still_known(self) -> bool:
        """Whether the agent still lists the instance (an unreachable agent counts as a failure)."""
        try:
            known = self.registration.service_id in (self.client.agent.services() or {})
        except CONSUL_ERRORS as error:
            self._failed(error)
            return True  # nothing to do until the agent answers again
        if self.last_error is not None:
            logger.info("The Consul agent at %s answers again", self.agent)
            self.last_error = None
        if not known:
            self.registered = False
            logger.warning(
                "The Consul agent at %s no longer knows %s (restarted?); registering it again",
                self.agent,
                self.registration.service_id,
            )
        return known

    def _failed(self, error: Exception) -> None:
        """Log the first failure of a run of failures; the rest would only repeat it."""
        first = self.last_error is None
        self.last_error = f"{type(error).__name__}: {error}"
        log = logger.warning if first else logger.debug
        log(
            "Consul agent at %s unreachable for %s (%s); retrying in the background, quietly until it answers",
            self.agent,
            self.registration.service_id,
            self.last_error,
        )

    def register_once(self) -> bool:
        registration = self.registration
        self.attempts += 1
        try:
            self.client.agent.service.register(
                registration.name,
                service_id=registration.service_id,
                address=registration.address,
                port=registration.port,
                tags=list(registration.tags),
                meta=registration.meta,
                check=registration.check,
            )
        except CONSUL_ERRORS as error:
            self._failed(error)
            return False
        self.registered, self.last_error = True, None
        logger.info(
            "Registered %s (%s:%d) with the Consul agent at %s",
            registration.service_id,
            registration.address,
            registration.port,
            self.agent,
        )
        return True

    def stop(self) -> None:
        """Stop retrying and deregister; safe to call twice, a no-op in forked children.

        An attempt in progress is waited for (at most the client's timeout),
        so it cannot register the instance again after it has left.
        """
        if not self.owned_here or self._stopping.is_set():
            return
        self._stopping.set()
        locked = self.attempt_lock.acquire(timeout=self.client.http.connections_timeout + 1)
        try:
            if not self.registered:
                return
            try:
                self.client.agent.service.deregister(self.registration.service_id)
            except CONSUL_ERRORS as error:
                logger.warning("Consul deregistration of %s failed: %s", self.registration.service_id, error)
                return
            self.registered = False
            logger.info("Deregistered %s from the Consul agent at %s", self.registration.service_id, self.agent)
        finally:
            if locked:
                self.attempt_lock.release()

    def state(self) -> dict:
        return {"service_id": self.registration.service_id, "registered": self.registered, "attempts": self.attempts}


_process_lock = threading.Lock()
_process_registrar: Registrar | None = None


def process_registrar() -> Registrar | None:
    """The registrar this very process started, if any (not one inherited through fork)."""
    registrar = _process_registrar
    return registrar if registrar is not None and registrar.owned_here else None


_held_for_fork: Registrar | None = None


def _before_fork() -> None:
    global _held_for_fork
    registrar = process_registrar()
    if registrar is not None:
        registrar.attempt_lock.acquire()
        _held_for_fork = registrar


def _after_fork() -> None:
    """In the parent and in the child alike: let attempts go on."""
    global _held_for_fork
    if _held_for_fork is not None:
        _held_for_fork.attempt_lock.release()
        _held_for_fork = None


# gunicorn forks workers while the master may be retrying in its thread. A fork
# in the middle of an attempt would hand the child locks held by a thread it
# does not have (a module being imported, say) and the worker could hang on
# them; so a fork waits for the attempt in progress to finish.
os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


def register_process(
    app_or_config: Flask | Mapping[str, Any], *, address: str | None = None, port: int | None = None
) -> Registrar:
    """Register this process's instance once; deregister it at exit and on SIGTERM.

    Call it from the code that starts serving (gunicorn's master, `flask
    run`, `python main.py`), never at import. Returns at once: the agent is
    contacted in the background.
    """
    global _process_registrar
    config = app_or_config.config if isinstance(app_or_config, Flask) else app_or_config
    with _process_lock:
        existing = process_registrar()
        if existing is not None:
            return existing
        registrar = Registrar(
            consul_client(config),
            Registration.from_config(config, address=address, port=port),
            agent=agent_address(config),
            max_delay=config["CONSUL_RETRY_MAX_DELAY"],
            resync_interval=config["CONSUL_RESYNC_INTERVAL"],
        )
        _process_registrar = registrar
    registrar.start()
    atexit.register(registrar.stop)
    exit_on_sigterm()
    return registrar


def exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit, so atexit hooks (deregistration) run.

    Only where nobody else handles SIGTERM (gunicorn does, and calls
    `gunicorn_on_exit`) and only from the main thread, where Python allows it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def flask_run_binding() -> tuple[str, int] | None:
    """(host, port) when this process is the one `flask run` serves from, else None.

    With the reloader on, the serving process is the reloader's child; the
    parent only watches files.
    """
    context = click.get_current_context(silent=True)
    if context is None or context.command.name != "run":
        return None
    reload = context.params.get("reload")
    if reload is None:
        reload = get_debug_flag()
    if reload and not is_running_from_reloader():
        return None
    return context.params.get("host") or "", int(context.params.get("port") or 5000)


@dataclass
class Answer:
    """What discovery knows about one service name until `expires` (monotonic seconds)."""

    expires: float
    instances: list[str]
    #: Why the last lookup failed, when it did and there was nothing older to fall back on.
    error: str | None = None


@dataclass
class Lookup:
    """One query to the agent, on a daemon thread; every caller waiting for that name shares it."""

    done: threading.Event = field(default_factory=threading.Event)
    instances: list[str] | None = None
    error: Exception | None = None


@dataclass
class RegistryState:
    """Per-app state: the Consul client, this instance's identity and the discovery cache."""

    config: Mapping[str, Any]
    client: consul.Consul
    cache_ttl: float
    lookup_timeout: float
    cache: dict[str, Answer] = field(default_factory=dict)
    lookups: dict[str, Lookup] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    turns: dict[str, itertools.count] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def agent(self) -> str:
        return agent_address(self.config)


class ServiceRegistry:
    """Flask extension: `service_registry.init_app(app)`, then `service_registry.resolve(name)`."""

    def __init__(self, app: Flask | None = None):
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        config = app.config
        app.extensions[EXTENSION_KEY] = RegistryState(
            config=config,
            client=consul_client(config),
            cache_ttl=config["SERVICE_DISCOVERY_CACHE_TTL"],
            lookup_timeout=config["SERVICE_DISCOVERY_TIMEOUT"],
        )
        add_readiness_check(app, "service_registry", lambda: self.readiness(app), critical=False)
        binding = flask_run_binding() if config["AUTO_REGISTER_SERVICE"] else None
        if binding is not None:
            host, port = binding
            register_process(app, address=None if host in WILDCARD_ADDRESSES else host, port=port)

    @staticmethod
    def state(app: Flask | None = None) -> RegistryState:
        return (app or current_app).extensions[EXTENSION_KEY]

    def register_process(self, app: Flask) -> Registrar | None:
        """For `python main.py`: register (when AUTO_REGISTER_SERVICE is on) before serving."""
        if not app.config["AUTO_REGISTER_SERVICE"]:
            return None
        return register_process(app)

    def readiness(self, app: Flask) -> dict:
        """Whether this instance is in Consul; raises (non-critically) while it is not."""
        state = self.state(app)
        if not app.config["AUTO_REGISTER_SERVICE"]:
            return {"auto_register": False}
        registrar = process_registrar()
        if registrar is not None:  # this process registers (flask run, python main.py)
            if registrar.registered:
                return registrar.state()
            raise NotRegisteredError(
                f"not registered with the Consul agent at {state.agent} after {registrar.attempts} "
                f"attempt(s), retrying in the background: {registrar.last_error or 'first attempt running'}"
            )
        # A gunicorn worker: its master registered; ask the agent.
        service_id = instance_id(app.config)
        try:
            services = state.client.agent.services() or {}
        except CONSUL_ERRORS as error:
            raise NotRegisteredError(f"the Consul agent at {state.agent} is unreachable: {error}") from error
        if service_id in services:
            return {"service_id": service_id, "registered": True}
        raise NotRegisteredError(f"{service_id} is not registered with the Consul agent at {state.agent}")

    def resolve(self, name: str, app: Flask | None = None, *, timeout: float | None = None) -> str:
        """The base URL (http://address:port) of a healthy instance of `name`.

        A URL configured for the name in DOWNSTREAM_SERVICES wins and Consul
        is not asked. Otherwise calls are spread round-robin over the
        instances whose checks all pass, from a list cached for
        SERVICE_DISCOVERY_CACHE_TTL seconds. The agent is given at most
        `timeout` seconds (the caller's remaining deadline), and never more
        than SERVICE_DISCOVERY_TIMEOUT: past that the query goes on in the
        background for whoever asks next, and this call fails or uses the
        last known list. A failed lookup is remembered for FAILED_LOOKUP_TTL
        seconds, so callers meanwhile do not each wait on a broken agent.
        Raises NoHealthyInstanceError when there is nothing to offer.
        """
        state = self.state(app)
        configured = (state.config.get("DOWNSTREAM_SERVICES") or {}).get(name)
        if configured:
            return configured
        wait = state.lookup_timeout if timeout is None else max(0.0, min(timeout, state.lookup_timeout))
        instances = self._instances(state, name, wait)
        if not instances:
            raise NoHealthyInstanceError(name, f"no instance passes its checks in Consul at {state.agent}")
        with state.lock:
            turn = next(state.turns.setdefault(name, itertools.count()))
        return instances[turn % len(instances)]

    def _instances(self, state: RegistryState, name: str, wait: float) -> list[str]:
        now = time.monotonic()
        with state.lock:
            known = state.cache.get(name)
            if known is not None and now < known.expires:
                if known.error is not None:
                    raise NoHealthyInstanceError(name, known.error)
                return known.instances
            lookup = state.lookups.get(name)
            if lookup is None:
                lookup = state.lookups[name] = Lookup()
                threading.Thread(
                    target=self._look_up, args=(state, name, lookup), name="consul-lookup", daemon=True
                ).start()
        if lookup.done.wait(wait) and lookup.error is None:
            return lookup.instances
        reason = (
            f"the Consul agent at {state.agent} did not answer within {wait:.2f} s"
            if lookup.error is None
            else f"the Consul agent at {state.agent} is unreachable: {lookup.error}"
        )
        fallback = known.instances if known is not None else []
        with state.lock:
            landed = state.cache.get(name)
            ours = landed is known  # else another caller's lookup answered meanwhile
            if ours:
                state.cache[name] = Answer(time.monotonic() + FAILED_LOOKUP_TTL, fallback, None if fallback else reason)
                first = name not in state.failing
                state.failing.add(name)
        if not ours:
            if landed.error is not None:
                raise NoHealthyInstanceError(name, landed.error)
            return landed.instances
        log = logger.warning if first else logger.debug  # once per outage, not per call
        if fallback:
            log("%s; using the last known %s instances", reason, name)
            return fallback
        log("%s; %s cannot be resolved for %.1f s", reason, name, FAILED_LOOKUP_TTL)
        raise NoHealthyInstanceError(name, reason)

    @staticmethod
    def _look_up(state: RegistryState, name: str, lookup: Lookup) -> None:
        try:
            _, entries = state.client.health.service(name, passing=True)
            lookup.instances = [base_url(entry) for entry in entries or []]
            with state.lock:
                state.cache[name] = Answer(time.monotonic() + state.cache_ttl, lookup.instances)
                recovered = name in state.failing
                state.failing.discard(name)
            if recovered:
                logger.info("The Consul agent at %s answers again for %s", state.agent, name)
        except Exception as error:  # reported to the callers waiting, not lost on this thread
            lookup.error = error
        finally:
            with state.lock:
                state.lookups.pop(name, None)
            lookup.done.set()


def base_url(entry: Mapping[str, Any]) -> str:
    """http://address:port of one /v1/health/service entry (the node's address if the service has none)."""
    service = entry["Service"]
    address = service.get("Address") or entry["Node"]["Address"]
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{service['Port']}"


def gunicorn_when_ready(server, config: Mapping[str, Any]) -> None:
    """In gunicorn's master, once the sockets are bound: register the instance once for all workers."""
    if not config["AUTO_REGISTER_SERVICE"]:
        return
    address, port = None, None
    for listener in getattr(server, "LISTENERS", []):
        bound = listener.sock.getsockname()
        if isinstance(bound, tuple):  # TCP; a unix socket has a path
            host, port = bound[0], bound[1]
            address = None if host in WILDCARD_ADDRESSES else host
            break
    registrar = register_process(config, address=address, port=port)
    # Workers are forked after this hook and inherit the environment: their
    # readiness checks then ask the agent about exactly this id.
    os.environ["SERVICE_ID"] = registrar.registration.service_id
    deregister_before_draining(server)


#: The master's handlers of the signals that stop gunicorn (graceful, then fast).
STOP_HANDLERS = ("handle_term", "handle_int", "handle_quit")


def deregister_before_draining(server) -> None:
    """Leave Consul as soon as gunicorn's master is told to stop, before it drains.

    On SIGTERM gunicorn closes its sockets, waits up to graceful_timeout for
    the requests in flight and only then runs `on_exit`: deregistering there
    would leave the instance in discovery, and callers sending to a closed
    port, for the whole drain. gunicorn has no hook at that moment, but its
    master looks its handlers up by name (`handle_term`, ...) on the arbiter
    when the signal arrives: wrapping them runs the deregistration first.
    """
    for name in STOP_HANDLERS:
        stop = getattr(server, name, None)
        if stop is None:
            continue

        def deregister_then(stop=stop) -> None:
            gunicorn_on_exit(server)
            stop()

        setattr(server, name, deregister_then)


def gunicorn_on_exit(server) -> None:
    """In gunicorn's master: deregister the instance (once; a no-op if the stop signal did already)."""
    registrar = process_registrar()
    if registrar is not None:
        registrar.stop()
