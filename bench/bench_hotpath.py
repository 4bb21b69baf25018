"""What every feature costs on the hot path: all-on against all-off, plus one feature off at a time.

Renders PostgreSQL projects with every feature on, with every feature off,
and with every feature on but one, serves each with gunicorn and the
project's own gunicorn.conf.py (2 workers, as in the issue that asked for
this), and loads the same GET of one stored resource with `wrk` over
loopback. The all-on project also runs a second time with 10% trace
sampling (OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG=0.1).

Every feature does its whole job with default settings: spans are exported
over OTLP/HTTP to a sink that accepts and discards them (a real collector's
work for the exporter, unlike a port where nothing listens), rate limits are
counted in the real Redis, the outbox relay runs in the app's workers and
publishes to the real RabbitMQ, the service registers with a Consul
stand-in. Only the rate limit itself is raised so that wrk's one client
address is never refused.

wrk opens its keep-alive connections all at once, and the first gunicorn
worker to wake can accept every one of them; such a run measures one
worker on one core (about half the throughput) instead of the service. The
bench reads each worker's CPU time and measures again when one worker did
more than 80% of the work (it prints each such run and how many there were).

Rounds are interleaved (each round serves every variant once, in a rotated
order) so a busy machine hurts all variants alike, and two figures are
reported per variant: requests per second, and the service's own CPU time
per request (user + system of the gunicorn master and workers, read from
/proc), which is steadier than req/s on a shared machine. Ratios are
against all-off: req/s ratio = variant / all-off; CPU ratio = all-off CPU
per request / variant CPU per request (both 1.0 for free, lower is costlier).
Each ratio is given twice: of the medians over all rounds, and as the
median (and range) of each round's own ratio, which cancels the machine's
slower swings in speed.

    python bench/bench_hotpath.py [--seconds 8] [--rounds 3] [--only all-on,all-off] [--calls]

`--calls` measures something else: the Python function calls per request,
each variant's app in one process with Flask's test client. Two columns:
every thread of the process (cProfile, which on Python 3.12 sees all
threads, so the span exporter and the outbox relay count too), and the
request's own thread alone (sys.setprofile). Calls are not CPU time (a call
into psycopg or a socket costs more than a dict lookup), but their ratio
followed the CPU ratio within a few hundredths here, and a cut or a
regression shows in it at once, to the call. The request-thread column is
exact and repeatable; the all-threads column is not quite: the relay and the
exporter work by the clock, so on a busy machine, where each request takes
longer, more of their calls fall on each request.

Needs PostgreSQL, Redis and RabbitMQ on their default local ports (the
template's test services) and wrk (Debian: apt-get install wrk). The
projects' virtualenv is built once from the all-on requirements and cached
in .cache/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent
CACHE = TEMPLATE / ".cache"
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TOGGLES = (
    "use_api_versioning",
    "use_metrics",
    "use_service_registry",
    "use_tracing",
    "use_circuit_breaker",
    "use_rate_limiting",
)
ALL_ON = {
    "database": "postgresql",
    "outbox": "rabbitmq",
    "use_kubernetes": False,
    **{toggle: True for toggle in TOGGLES},
}
ALL_OFF = {**ALL_ON, "outbox": "none", **{toggle: False for toggle in TOGGLES}}
SAMPLING_10 = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
WORKERS = 2
CONNECTIONS = 16


def variants() -> dict[str, tuple[dict, dict]]:
    """name -> (answers, extra environment)."""
    table = {"all-off": (ALL_OFF, {}), "all-on": (ALL_ON, {}), "all-on 10% sampled": (ALL_ON, SAMPLING_10)}
    for toggle in TOGGLES:
        table[f"all-on minus {toggle.removeprefix('use_')}"] = ({**ALL_ON, toggle: False}, {})
    table["all-on minus outbox"] = ({**ALL_ON, "outbox": "none"}, {})
    return table


# -- stand-ins, each in a process of its own (their CPU is not the service's) ---------


class Sink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (and Consul agent calls) and discards them."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/v1/traces"):
            body, kind = b"", "application/x-protobuf"  # an empty ExportTraceServiceResponse
        elif self.path.startswith(("/v1/health/", "/v1/catalog/")):
            body, kind = b"[]", "application/json"
        else:
            body, kind = b"{}", "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Consul-Index", "1")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


def serve_sink(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


# -- helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(root: Path, name: str, answers: dict) -> Path:
    from cookiecutter.main import cookiecutter

    out = root / re.sub(r"[^a-z0-9]+", "-", name.lower())
    with contextlib.redirect_stdout(io.StringIO()):  # the post-generation summary
        cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(out), extra_context=answers)
    [project] = [path for path in out.iterdir() if path.is_dir()]
    return project


def working_python(version: str) -> str:
    """An interpreter of `version` that really runs (a pyenv shim of an inactive version does not)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return sys.executable


def project_venv(project: Path) -> Path:
    """A virtualenv with the all-on project's requirements, cached by their content."""
    requirements = (project / "requirements.txt").read_text()
    python = working_python("3.12")
    key = hashlib.sha256((python + requirements).encode()).hexdigest()[:16]
    venv = CACHE / f"bench-hotpath-venv-{key}"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        print(f"building {venv} ...", flush=True)
        uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
        if uv:  # much faster than pip, when the template's venv has it
            subprocess.run([uv, "venv", "--quiet", "-p", python, str(venv)], check=True)
            install = [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
        else:
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            install = [str(venv / "bin" / "pip"), "install", "--quiet"]
        subprocess.run([*install, "-r", str(project / "requirements.txt")], check=True)
        (venv / ".installed").touch()
    return venv


def admin(sql: str) -> None:
    subprocess.run(["psql", f"{POSTGRES}/postgres", "-qXc", sql], check=True, capture_output=True)


def process_cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def busiest_share(before: dict[int, float], after: dict[int, float], master: int) -> float:
    """The busiest worker's share of the workers' CPU time between two readings (0.5 is even for two)."""
    spent = [after[pid] - before.get(pid, 0.0) for pid in after if pid != master]
    return max(spent) / sum(spent) if sum(spent) > 0 else 1.0


def group_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    found = [master]
    if children.exists():
        found += [int(pid) for pid in children.read_text().split()]
    return found


#: A measurement counts only if no worker did more than this share of the workers' CPU. wrk opens
#: its keep-alive connections at once, and the first gunicorn worker to wake may accept all of
#: them: the run then measures one worker on one core (about half the throughput, and more CPU
#: per request from its threads contending), not the service. Such a run is made again.
BALANCED = 0.8
MAX_MEASUREMENTS = 6


def wrk(url: str, seconds: int) -> dict:
    result = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": requests, "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else ""}


class Server:
    """One variant served by gunicorn with the project's own configuration."""

    def __init__(self, name: str, project: Path, venv: Path, database: str, extra_env: dict, sink_port: int):
        self.name, self.project, self.venv = name, project, venv
        self.port = free_port()
        metrics_dir = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DATABASE_URL", "PROMETHEUS"))},
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "ENVIRONMENT": "development",
            "SECRET_KEY": uuid.uuid4().hex * 2,
            "DATABASE_URL": f"{POSTGRES.replace('postgresql://', 'postgresql+psycopg://')}/{database}",
            "SERVICE_PORT": str(self.port),
            "GUNICORN_WORKERS": str(WORKERS),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "RATELIMIT_STORAGE_URI": REDIS,
            "RATELIMIT_KEY_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "RATELIMIT_DEFAULT": "100000000 per minute",
            "RATELIMIT_WRITE": "100000000 per minute",
            "AMQP_URL": AMQP,
            "OUTBOX_EXCHANGE": f"bench-{uuid.uuid4().hex[:8]}",
            "CONSUL_HOST": "127.0.0.1",
            "CONSUL_PORT": str(sink_port),
            "SERVICE_ADDRESS": "127.0.0.1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "FLASK_APP": "main.py",
            **extra_env,
        }
        self.process: subprocess.Popen | None = None

    def migrate(self) -> None:
        subprocess.run(
            [str(self.venv / "bin" / "flask"), "db", "upgrade", "heads"],
            cwd=self.project, env=self.env, check=True, capture_output=True,
        )

    def start(self) -> None:
        # A fresh, empty multiprocess folder per start: gunicorn_on_starting refuses one
        # holding files it did not create (`flask db upgrade` leaves some).
        self.env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-metrics-")
        self.log = self.project / "gunicorn.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.venv / "bin" / "gunicorn"), "--config", "gunicorn.conf.py"],
                cwd=self.project, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{self.name}: gunicorn did not start; see {self.log}") from None
                time.sleep(0.2)
        while len(group_pids(self.process.pid)) < WORKERS + 1:
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def item_url(self) -> str:
        spec = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/openapi.json", timeout=10))
        collection = next(path for path in spec["paths"] if "{" not in path)
        body = json.dumps({"name": f"bench-{uuid.uuid4().hex[:8]}", "quantity": 1, "unit_price": "9.99"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{collection}", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            item = json.load(response)
        return f"http://127.0.0.1:{self.port}{collection}/{item['id']}"

    def measure(self, url: str, seconds: float) -> dict:
        wrk(url, 2)  # warm up: workers import lazily, the relay starts on a first request
        pids = group_pids(self.process.pid)
        before = {pid: process_cpu_seconds([pid]) for pid in pids}
        result = wrk(url, seconds)
        after = {pid: process_cpu_seconds([pid]) for pid in pids}
        cpu = sum(after.values()) - sum(before.values())
        if result["non_2xx"] or re.search(r"(connect|read|write) [1-9]", result["socket_errors"]):
            raise SystemExit(f"{self.name}: {result}; see {self.log}")
        # wrk's own 2 s timeouts only happen on an overloaded machine: noted, not fatal.
        return {
            "rps": result["requests"] / seconds,
            "cpu_ms": 1000 * cpu / max(1, result["requests"]),
            "busiest_worker": busiest_share(before, after, self.process.pid),
        }


CALLS_SCRIPT = """
import cProfile, json, logging, os, pstats, sys, uuid
sys.path.insert(0, os.getcwd())
import main
app = main.app
logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))
client = app.test_client()
spec = client.get("/api/openapi.json").get_json()
collection = next(path for path in spec["paths"] if "{" not in path)
created = client.post(collection, json={"name": "calls-" + uuid.uuid4().hex[:8], "quantity": 1, "unit_price": "9.99"})
url = f"{collection}/{created.get_json()['id']}"
requests = int(sys.argv[1])
for _ in range(200):
    assert client.get(url).status_code == 200
profile = cProfile.Profile()
profile.enable()
for _ in range(requests):
    client.get(url)
profile.disable()
stats = pstats.Stats(profile).stats
counted = [0]

def count(frame, event, arg):
    if event == "call" or event == "c_call":
        counted[0] += 1

sys.setprofile(count)  # this thread only: the request's own calls
for _ in range(requests):
    client.get(url)
sys.setprofile(None)
print(json.dumps({"calls": sum(value[1] for value in stats.values()) / requests, "request_calls": counted[0] / requests}))
os._exit(0)
"""


def count_calls(server: Server, requests: int) -> dict[str, float]:
    env = {**server.env, "AUTO_REGISTER_SERVICE": "false"}
    out = subprocess.run(
        [str(server.venv / "bin" / "python"), "-c", CALLS_SCRIPT, str(requests)],
        cwd=server.project, env=env, capture_output=True, text=True,
    )
    if out.returncode:
        raise SystemExit(f"{server.name}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_calls(calls: dict[str, dict[str, float]], requests: int) -> None:
    base = calls["all-off"]
    print()
    print(f"Python function calls per GET (in process, {requests} requests after 200 to warm up)")
    print("| variant | calls/request | ratio (all-off / variant) | request thread | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, value in calls.items():
        print(
            f"| {name} | {value['calls']:,.0f} | {base['calls'] / value['calls']:.2f}"
            f" | {value['request_calls']:,.0f} | {base['request_calls'] / value['request_calls']:.2f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="measured seconds per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variant names (all-off is always included)")
    parser.add_argument("--calls", action="store_true", help="count Python calls per request instead (the request thread's count is load-proof)")
    parser.add_argument("--requests", type=int, default=500, help="requests counted per variant with --calls")
    args = parser.parse_args()
    if shutil.which("wrk") is None and not args.calls:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    chosen = variants()
    if args.only:
        wanted = {"all-off", *args.only.split(",")}
        chosen = {name: value for name, value in chosen.items() if name in wanted}
    root = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    sink_port = free_port()
    sink = multiprocessing.Process(target=serve_sink, args=(sink_port,), daemon=True)
    sink.start()
    servers: dict[str, Server] = {}
    databases = []
    try:
        projects = {name: render(root, name, answers) for name, (answers, _) in chosen.items()}
        venv = project_venv(projects.get("all-on") or render(root, "venv-source", ALL_ON))
        urls = {}
        for name, (_, extra_env) in chosen.items():
            database = f"bench_{uuid.uuid4().hex[:10]}"
            admin(f"CREATE DATABASE {database}")
            databases.append(database)
            server = Server(name, projects[name], venv, database, extra_env, sink_port)
            server.migrate()
            servers[name] = server
            if args.calls:
                continue
            server.start()
            urls[name] = server.item_url()
            server.stop()
        if args.calls:
            report_calls({name: count_calls(servers[name], args.requests) for name in chosen}, args.requests)
            return 0
        load = os.getloadavg()[0]
        results: dict[str, list[dict]] = {name: [] for name in chosen}
        unbalanced: list[str] = []
        names = list(chosen)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                server = servers[name]
                server.start()
                try:
                    for _ in range(MAX_MEASUREMENTS):
                        last = server.measure(urls[name], args.seconds)
                        if last["busiest_worker"] <= BALANCED:
                            break
                        unbalanced.append(f"round {round_index + 1} {name}")
                        print(f"round {round_index + 1} {name:32s} one worker served {last['busiest_worker']:.0%}: again")
                    results[name].append(last)
                finally:
                    server.stop()
                print(
                    f"round {round_index + 1} {name:32s} {last['rps']:8.0f} req/s {last['cpu_ms']:6.3f} ms CPU/req"
                    f" (busiest worker {last['busiest_worker']:.0%} of the workers' CPU)",
                    flush=True,
                )
        report(results, load, os.getloadavg()[0], args)
        print(f"measured again because one worker had (nearly) every connection: {len(unbalanced)}")
    finally:
        for server in servers.values():
            server.stop()
        for database in databases:
            admin(f"DROP DATABASE IF EXISTS {database}")
        sink.terminate()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict]], load_before: float, load_after: float, args) -> None:
    """Two ratios per variant: of the medians, and the median of each round's own ratio.

    A round measures every variant within a minute or so, so its own ratio
    cancels the machine's slower swings in speed (on a shared 2-core machine a
    fixed CPU loop took from 0.12 to 0.20 s within a minute), which the
    medians taken over all rounds do not.
    """
    base_rps = statistics.median(r["rps"] for r in results["all-off"])
    base_cpu = statistics.median(r["cpu_ms"] for r in results["all-off"])
    print()
    print(
        f"{args.rounds} rounds x {args.seconds:g} s per variant, gunicorn {WORKERS} workers, wrk {CONNECTIONS}"
        f" connections; load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        "| variant | req/s (median) | req/s ratio | per-round req/s ratio: median (min-max)"
        " | CPU ms/request (median) | CPU ratio | per-round CPU ratio: median (min-max) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        rps = statistics.median(r["rps"] for r in rounds)
        cpu = statistics.median(r["cpu_ms"] for r in rounds)
        rps_ratios = [r["rps"] / off["rps"] for r, off in zip(rounds, results["all-off"], strict=True)]
        cpu_ratios = [off["cpu_ms"] / r["cpu_ms"] for r, off in zip(rounds, results["all-off"], strict=True)]
        print(
            f"| {name} | {rps:,.0f} | {rps / base_rps:.2f} | {spread(rps_ratios)}"
            f" | {cpu:.3f} | {base_cpu / cpu:.2f} | {spread(cpu_ratios)} |"
        )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    sys.exit(main())
