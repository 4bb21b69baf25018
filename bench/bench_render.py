"""Render time of one all-features project, hooks included, against bare cookiecutter.

Both are timed in the same run on the same machine, interleaved, so the
ratio means something on a shared, noisy machine where absolute times do not:

- in-process, cookiecutter's Python API: this template with its hooks against
  the same template rendered by bare cookiecutter with hooks off (what the
  hooks add: validation, file removal, migration and compose writing);
- command line, `cookiecutter --no-input` as a user runs it: this template
  against a one-file, one-question template (what cookiecutter itself costs).

Prints medians and the ratios; asserts nothing.

    python bench/bench_render.py [--runs 15]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parent.parent


def bare_template(root: Path) -> Path:
    template = root / "bare"
    (template / "{{cookiecutter.name}}").mkdir(parents=True)
    (template / "cookiecutter.json").write_text(json.dumps({"name": "bare"}))
    (template / "{{cookiecutter.name}}" / "README.md").write_text("# {{ cookiecutter.name }}\n")
    return template


def all_on_answers() -> dict:
    questions = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    return {key: True for key, value in questions.items() if isinstance(value, bool)}


def time_api(template: Path, output: Path, extra: dict, hooks: bool = True) -> float:
    started = time.perf_counter()
    cookiecutter(
        str(template),
        no_input=True,
        output_dir=str(output),
        extra_context=extra,
        overwrite_if_exists=True,
        accept_hooks=hooks,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(output)
    return elapsed


def time_cli(template: Path, output: Path, extra: dict) -> float:
    args = [f"{key}={'yes' if value is True else value}" for key, value in extra.items()]
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cookiecutter", "--no-input", "-f", "-o", str(output), str(template), *args],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(output)
    return elapsed


@contextlib.contextmanager
def quiet_stdout():
    """Silence the post-generation hook's summary (written by a subprocess to fd 1)."""
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bare = bare_template(root)
        ours_extra = all_on_answers()
        results = {}
        cases = {
            "in-process, hooks vs no hooks": (
                lambda: time_api(TEMPLATE, root / "ours", ours_extra),
                lambda: time_api(TEMPLATE, root / "base", ours_extra, hooks=False),
            ),
            "command line, vs one-file template": (
                lambda: time_cli(TEMPLATE, root / "ours", ours_extra),
                lambda: time_cli(bare, root / "base", {}),
            ),
        }
        for label, (ours_timer, base_timer) in cases.items():
            ours, base = [], []
            with quiet_stdout():
                ours_timer()  # the first render imports and compiles
                for _ in range(runs):
                    ours.append(ours_timer())
                    base.append(base_timer())
            results[label] = (statistics.median(ours), statistics.median(base))
    print(f"{runs} renders each, medians; features on: {', '.join(sorted(ours_extra))}")
    for label, (ours, base) in results.items():
        print(f"{label:>36}: {ours * 1000:7.1f} ms vs {base * 1000:7.1f} ms, ratio {ours / base:5.2f}")


if __name__ == "__main__":
    main()
