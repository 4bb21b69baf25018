"""Run a generated project's own test suite the way its README says, and judge it strictly.

Everything here runs in background threads while the main thread renders the
matrix (and changes directory to do so): every path is absolute and every
subprocess gets an explicit cwd.

For each project: render it with the real cookiecutter (a subprocess, as a
user would), build ITS OWN virtualenv from ITS OWN requirements-dev.txt on the
Python version its pyproject.toml declares (uv, from uv's package cache, so a
venv takes seconds), check that every package its code imports is installed
there, give it a fresh database on the real server, run `make test` once, and
judge that one run:

- no rerun of any kind: the first result is the result;
- pytest's junit XML must show no failure, no error and no skip (a skip would
  mean a real service was silently not tested), and as many passed tests as
  pytest collected (and at least one);
- the exit code must be 0.

Suites run in background lanes (`Lanes`), started when collection ends, so
they share the two cores with the in-process matrix instead of waiting for it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.combinations import TEMPLATE, combination_id

WORK = TEMPLATE / ".cache" / "suites"
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("TEST_MYSQL_ADMIN_URL", "mysql://root@127.0.0.1:3306/")
SERVICE_URLS = {
    "TEST_AMQP_URL": os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "TEST_REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "TEST_RABBITMQCTL": os.environ.get("TEST_RABBITMQCTL", "rabbitmqctl"),
}
SUITE_TIMEOUT = 900
#: Concurrent generated suites; the in-process matrix runs beside them. A suite
#: keeps a core busy about half of its time (it waits for servers, brokers and
#: subprocesses), so three share two cores without leaving them idle.
LANES = int(os.environ.get("SUITE_LANES", "3"))
COLLECTED = re.compile(r"^collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", re.MULTILINE)


class SuiteFailed(AssertionError):
    pass


class Unavailable(Exception):
    """A real service or interpreter the suite needs is missing (a skip on a laptop, a failure in CI)."""


@dataclass
class Suite:
    """One generated project to test: its answers (including python_version) and a name."""

    answers: dict
    name: str = ""

    def __post_init__(self):
        if not self.name:
            matrix_answers = {key: value for key, value in self.answers.items() if key != "python_version"}
            self.name = f"py{self.answers.get('python_version', '')}-{combination_id(matrix_answers)}"


@dataclass
class Outcome:
    suite: Suite
    passed: int = 0
    collected: int = 0
    python: str = ""
    seconds: dict = field(default_factory=dict)  # step -> wall seconds
    cpu: float = 0.0  # CPU seconds of `make test` and every process it waited for
    error: str | None = None
    unavailable: str | None = None
    slowest: list = field(default_factory=list)  # (seconds, test id)


# --- interpreters and virtualenvs ----------------------------------------------------------


def find_python(version: str) -> str:
    """An interpreter of exactly this X.Y version: on PATH, or installed by pyenv."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            cwd=TEMPLATE,
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    raise Unavailable(f"no Python {version} interpreter (on PATH or under {root}/versions)")


def declared_python(project: Path) -> str:
    """The X.Y the project declares in pyproject.toml's requires-python (>=X.Y)."""
    text = (project / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^requires-python\s*=\s*">=\s*(\d+\.\d+)', text, re.MULTILINE)
    if not match:
        raise SuiteFailed("pyproject.toml declares no requires-python >=X.Y")
    return match.group(1)


def uv() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise Unavailable("uv is not installed (requirements-dev.txt)")
    return found


def uv_environment() -> dict:
    # Never download an interpreter: the project's declared version must be installed.
    return {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}


def build_venv(project: Path, python: str) -> Path:
    """The project's own .venv from its own requirements-dev.txt, as `make install` would build it."""
    venv = project / ".venv"
    run = {"capture_output": True, "text": True, "env": uv_environment(), "check": False}
    created = subprocess.run([uv(), "venv", "--quiet", "--python", python, str(venv)], cwd=project, **run)
    if created.returncode != 0:
        raise SuiteFailed(f"uv venv failed:\n{created.stderr}")
    installed = subprocess.run(
        [uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "-r", "requirements-dev.txt"],
        cwd=project,
        **run,
    )
    if installed.returncode != 0:
        raise SuiteFailed(f"installing requirements-dev.txt failed:\n{installed.stderr[-3000:]}")
    # The Makefile's install step is up to date now: `make test` must not reinstall.
    (venv / "bin" / ".installed").touch()
    return venv


IMPORTS = """
import json, sys
from pathlib import Path
from tests.project_checks import third_party_imports
from tests.rendering import read_tree
print(json.dumps(third_party_imports(read_tree(Path(sys.argv[1]), {}, {}))))
"""


def load_time_imports(project: Path) -> dict[str, list[str]]:
    """tests.project_checks.third_party_imports of a project on disk.

    In a subprocess: CPython's ast module is not safe to use from two threads at
    once ("AST constructor recursion depth mismatch"), and the matrix parses
    in the main thread while this lane runs.
    """
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(project)], cwd=TEMPLATE, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SuiteFailed(f"cannot read the project's imports:\n{result.stderr}")
    return json.loads(result.stdout)


def missing_imports(imports: dict[str, list[str]], venv: Path) -> list[str]:
    """Packages the project's code imports (name -> where) that its own requirements did not install."""
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, json, sys; "
            "print(json.dumps([n for n in json.load(sys.stdin) if importlib.util.find_spec(n) is None]))",
        ],
        input=json.dumps(sorted(imports)),
        cwd=venv,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return [f"cannot probe the venv: {probe.stderr}"]
    return [f"{name} (imported by {', '.join(imports[name][:3])})" for name in json.loads(probe.stdout)]


# --- databases --------------------------------------------------------------------------------


def connect_admin(url: str):
    try:
        if url.startswith("postgresql"):
            import psycopg

            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        import pymysql

        rest = url.split("://", 1)[1]
        credentials, _, host = rest.partition("@")
        user, _, password = credentials.partition(":")
        hostname, _, port = host.rstrip("/").partition(":")
        return pymysql.connect(
            host=hostname, port=int(port or 3306), user=user, password=password, autocommit=True, connect_timeout=10
        )
    except Exception as error:  # any connection failure means the server is not usable
        raise Unavailable(f"cannot reach the database server at {url}: {error}") from error


@contextmanager
def fresh_database(database: str):
    """A new empty database on the real server, dropped afterwards; None for SQLite."""
    if database == "sqlite":
        yield None
        return
    name = f"gen_{uuid.uuid4().hex[:12]}"
    admin_url = POSTGRES_ADMIN_URL if database == "postgresql" else MYSQL_ADMIN_URL
    connection = connect_admin(admin_url)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        if database == "postgresql":
            yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        else:
            yield f"{MYSQL_ADMIN_URL.rstrip('/')}/{name}"
    finally:
        # A process the suite started and did not stop may still hold a connection:
        # PostgreSQL ends those sessions instead of refusing the drop.
        force = " WITH (FORCE)" if database == "postgresql" else ""
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}{force}")
        connection.close()


# --- rendering, running, judging ----------------------------------------------------------------

RENDER = """
import json, sys
from cookiecutter.main import cookiecutter
request = json.load(sys.stdin)
print(cookiecutter(request["template"], no_input=True, extra_context=request["answers"],
                   output_dir=request["output"], default_config=request["config"]))
"""


def render(answers: dict, output: Path) -> Path:
    """`cookiecutter --no-input` with these answers, in a subprocess, as a user runs it."""
    output.mkdir(parents=True, exist_ok=True)
    request = {
        "template": str(TEMPLATE),
        "answers": answers,
        "output": str(output),
        "config": {"replay_dir": str(output / ".replay"), "cookiecutters_dir": str(output / ".cookiecutters")},
    }
    result = subprocess.run(
        [sys.executable, "-c", RENDER], input=json.dumps(request), cwd=output, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SuiteFailed(f"rendering failed:\n{result.stdout}\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def suite_environment(database_url: str | None, report: Path) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TEST_", "PYTEST_", "VIRTUAL_ENV", "DATABASE_URL", "UV_"))
    }
    env.update(SERVICE_URLS)
    env["TEST_REQUIRE_SERVICES"] = "1"
    # pytest's own record of the run; read instead of its terminal output.
    # Every test of a second or more is listed, for the run's summary of where time goes.
    env["PYTEST_ADDOPTS"] = f"--junitxml={report} --durations=0 --durations-min=1.0"
    if database_url:
        env["TEST_DATABASE_URL"] = database_url
    return env


def run_counted(command: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> tuple[int, float]:
    """Run a command to completion; its exit code and the CPU seconds of it and its waited-for children."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def judge(returncode: int, output: str, report: Path) -> tuple[int, int]:
    """Passed and collected counts of one pytest run; SuiteFailed unless every collected test passed."""
    collected_match = COLLECTED.findall(output)
    if not report.exists():
        raise SuiteFailed(f"pytest wrote no junit report (exit code {returncode})")
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in (case for suite in suites for case in suite.iter("testcase")):
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or "").splitlines()[0][:200] if element.get("message") else ""
                problems.append(f"{kind.upper()} {case.get('classname')}::{case.get('name')}: {message}")
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    if not collected_match:
        raise SuiteFailed("pytest did not say how many tests it collected")
    collected = int(collected_match[-1][2] or collected_match[-1][0])
    if problems or totals["failures"] or totals["errors"] or totals["skipped"]:
        raise SuiteFailed("\n".join(problems) or f"counts: {totals}")
    if collected == 0:
        raise SuiteFailed("pytest collected no test")
    if passed != collected:
        raise SuiteFailed(f"{passed} tests passed of {collected} collected")
    if returncode != 0:
        raise SuiteFailed(f"pytest exited with {returncode} although every test passed")
    return passed, collected


def slowest(output: str) -> list[tuple[float, str]]:
    return [(float(seconds), name) for seconds, name in re.findall(r"^(\d+\.\d+)s (?:call|setup|teardown)\s+(\S+)", output, re.M)]


@dataclass
class Run:
    """One `make test` of a project: what it printed, pytest's report, its CPU time."""

    returncode: int
    output: str
    report: Path
    log: Path
    cpu: float

    @property
    def slowest(self) -> list[tuple[float, str]]:
        return slowest(self.output)

    def judge(self) -> tuple[int, int]:
        try:
            return judge(self.returncode, self.output, self.report)
        except SuiteFailed as failure:
            tail = "\n".join(self.output.splitlines()[-25:])
            raise SuiteFailed(f"{failure}\n--- last lines of {self.log} ---\n{tail}") from None


def make_test(project: Path, database_url: str | None, workdir: Path) -> Run:
    """`make test` in the project, once, with the real services' URLs and pytest's junit report."""
    report = workdir / "junit.xml"
    log = workdir / "make-test.log"
    report.unlink(missing_ok=True)
    returncode, cpu = run_counted(
        ["make", "--no-print-directory", "test"], project, suite_environment(database_url, report), log, SUITE_TIMEOUT
    )
    return Run(returncode, log.read_text(encoding="utf-8", errors="replace"), report, log, cpu)


def run_suite(suite: Suite, workdir: Path) -> Outcome:
    """Render, build the venv, check imports, run `make test` once, judge it."""
    outcome = Outcome(suite)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        outcome.seconds[step] = now - clock
        clock = now

    keep = False
    try:
        project = render(suite.answers, workdir)
        lap("render")
        version = declared_python(project)
        if suite.answers.get("python_version") and version != suite.answers["python_version"]:
            raise SuiteFailed(f"pyproject.toml declares {version}, the answer was {suite.answers['python_version']}")
        outcome.python = version
        imports = load_time_imports(project)
        venv = build_venv(project, find_python(version))
        lap("venv")
        missing = missing_imports(imports, venv)
        if missing:
            raise SuiteFailed("the code imports packages its requirements do not install: " + "; ".join(missing))
        with fresh_database(suite.answers["database"]) as database_url:
            result = make_test(project, database_url, workdir)
        lap("suite")
        outcome.slowest, outcome.cpu = result.slowest, result.cpu
        try:
            outcome.passed, outcome.collected = result.judge()
        except SuiteFailed:
            keep = True
            raise
    except Unavailable as missing_service:
        outcome.unavailable = str(missing_service)
    except SuiteFailed as failure:
        outcome.error = str(failure)
    except Exception as error:  # a crash of the runner itself is reported on the suite's test
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcome


class Lanes:
    """Generated suites running in background threads, a fixed number at a time, longest first."""

    def __init__(self, suites: list[Suite], lanes: int = LANES, root: Path = WORK):
        self.root = root
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.pool = ThreadPoolExecutor(max_workers=max(1, lanes), thread_name_prefix="suite-lane")
        self.futures: dict[str, Future] = {}
        for suite in sorted(suites, key=estimated_cost, reverse=True):
            self.futures[suite.name] = self.pool.submit(run_suite, suite, root / f"s{len(self.futures)}")

    def result(self, suite: Suite) -> Outcome:
        return self.futures[suite.name].result()

    def outcomes(self) -> list[Outcome]:
        return [future.result() for future in self.futures.values() if future.done()]

    def shutdown(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.pool.shutdown(wait=True)


def estimated_cost(suite: Suite) -> int:
    """More features, more tests: run the big suites first so the lanes end together."""
    answers = suite.answers
    cost = sum(1 for value in answers.values() if value is True)
    cost += 3 if answers.get("outbox") == "rabbitmq" else 1 if answers.get("outbox") == "in_process" else 0
    cost += 1 if answers.get("database") != "sqlite" else 0
    return cost
