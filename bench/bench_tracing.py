"""Request throughput of a generated service under gunicorn, tracing on vs off.

Renders one project (SQLite, tracing on in the template), then serves it with
gunicorn twice per round on loopback: once with TRACING_ENABLED=false and once
with tracing on, exporting over OTLP to a port where nothing listens (the
batch exporter with no collector, the case that must not hurt). Both modes
run in the same process of this script, interleaved, so the ratio means
something on a shared machine where absolute numbers do not.

Load comes from `wrk` when it is installed (Debian: `apt-get install wrk`),
else from a small multi-process Python client. Every run is bounded in time;
traffic goes to 127.0.0.1 only. Also reports how long gunicorn takes to stop
on SIGTERM in each mode (the exporter must not hold up shutdown).

    python bench/bench_tracing.py [--seconds 5] [--rounds 2] [--python PATH]

`--python` is an interpreter that has the generated project's requirements
installed; without it, this one is used if it has them, otherwise a fresh
virtualenv is made in the temporary folder (needs the package index).
"""

from __future__ import annotations

import argparse
import http.client
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
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parent.parent
ANSWERS = {
    "database": "sqlite",
    "use_tracing": True,
    "use_api_versioning": True,
    "api_version": "v1",
    "resource_name": "order",
}
PATH = "/api/v1/orders"
CONNECTIONS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(root: Path) -> Path:
    cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(root), extra_context=ANSWERS)
    [project] = [path for path in root.iterdir() if path.is_dir()]
    return project


def project_python(project: Path, root: Path, chosen: str | None) -> str:
    """An interpreter that can run the project (see the module docstring)."""
    probe = "import flask, gunicorn, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http"
    candidate = chosen or sys.executable
    if subprocess.run([candidate, "-c", probe], capture_output=True).returncode == 0:
        return candidate
    if chosen:
        sys.exit(f"{chosen} lacks the project's requirements")
    venv = root / "venv"
    print(f"installing the project's requirements into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-r", str(project / "requirements.txt")], check=True
    )
    return python


def base_env(project: Path, root: Path) -> dict:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))},
        "DATABASE_URL": f"sqlite:///{root / 'bench.db'}",
        "ENVIRONMENT": "development",  # unset would be production, which refuses local defaults
        "LOG_LEVEL": "WARNING",  # the access log would dominate: it is the same either way
        "AUTO_REGISTER_SERVICE": "false",
        "RATELIMIT_ENABLED": "false",
        "OUTBOX_ENABLED": "false",
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "1",
        "FLASK_APP": "main.py",
    }


def mode_env(env: dict, mode: str, root: Path) -> dict:
    env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(root / f"metrics-{mode}")}
    if mode == "off":
        return {**env, "TRACING_ENABLED": "false"}
    if mode == "no-export":
        return {**env, "TRACING_ENABLED": "true", "OTEL_TRACES_EXPORTER": "none"}
    return {
        **env,
        "TRACING_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody listens
    }


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"gunicorn exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit("gunicorn did not serve in time")


def load_with_wrk(port: int, seconds: float) -> float:
    output = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        sys.exit(f"wrk saw {errors.group(1)} error responses:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def _client(port: int, seconds: float, counts) -> None:
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", PATH)
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
        done += 1
    counts.put(done)


def load_with_python(port: int, seconds: float) -> float:
    counts = multiprocessing.Queue()
    clients = [
        multiprocessing.Process(target=_client, args=(port, seconds, counts)) for _ in range(CONNECTIONS)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()
    total = sum(counts.get(timeout=seconds + 30) for _ in clients)
    for client in clients:
        client.join()
    return total / (time.monotonic() - started)


def run_once(project: Path, python: str, env: dict, seconds: float, load) -> tuple[float, float]:
    """(requests per second, seconds gunicorn took to stop on SIGTERM)."""
    port = free_port()
    process = subprocess.Popen(
        [python, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}{PATH}", process)
        load(port, 1.0)  # warm-up: both workers up, code paths hot
        rate = load(port, seconds)
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        return rate, time.perf_counter() - stopping
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load per run (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    parser.add_argument("--python", help="interpreter with the project's requirements")
    parser.add_argument(
        "--no-export", action="store_true", help="also run tracing on with OTEL_TRACES_EXPORTER=none"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    try:
        project = render(root / "out")
        python = project_python(project, root, args.python)
        env = base_env(project, root)
        subprocess.run(
            [python, "-m", "flask", "db", "upgrade"], cwd=project, env=env, check=True, capture_output=True
        )
        load = load_with_wrk if shutil.which("wrk") else load_with_python
        print(f"load: {'wrk' if load is load_with_wrk else 'python clients'}, {CONNECTIONS} connections, "
              f"GET {PATH}, gunicorn 2 sync workers, {args.seconds:g} s per run", flush=True)
        modes = ("off", "on", "no-export") if args.no_export else ("off", "on")
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for round_number in range(1, args.rounds + 1):
            for mode in modes:
                rate, stop = run_once(project, python, mode_env(env, mode, root), args.seconds, load)
                results[mode].append((rate, stop))
                print(f"round {round_number} tracing {mode:9}: {rate:8.1f} req/s, "
                      f"stop on SIGTERM {stop:.2f} s", flush=True)
        rate = {mode: statistics.mean(r for r, _ in runs) for mode, runs in results.items()}
        stop = {mode: max(s for _, s in runs) for mode, runs in results.items()}
        print(f"tracing off: {rate['off']:.1f} req/s (slowest stop {stop['off']:.2f} s)")
        print(f"tracing on, no collector: {rate['on']:.1f} req/s (slowest stop {stop['on']:.2f} s)")
        if args.no_export:
            print(f"tracing on, spans not exported: {rate['no-export']:.1f} req/s")
        ratios = [on[0] / off[0] for off, on in zip(results["off"], results["on"], strict=True)]
        print(f"throughput ratio on/off: {rate['on'] / rate['off']:.3f} (of the means); "
              f"per round {', '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
