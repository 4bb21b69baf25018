"""API fuzzing: schemathesis, with every one of its checks, finds nothing.

The service is served over HTTP from a thread (the session's app and
database), and the schemathesis command line runs against its own
/api/openapi.json: every phase (the document's examples, coverage of each
boundary, random valid and invalid requests, stateful sequences following
the links between operations) and every check (no 5xx, status codes,
content types, headers and bodies as documented, invalid data refused, valid
data accepted, a deleted item is gone, ...). Examples per operation are
bounded and the seed is fixed, so the run takes seconds and repeats; set
FUZZ_EXAMPLES higher locally for a deeper search.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from werkzeug.serving import make_server

logger = logging.getLogger(__name__)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))  # per operation and phase
SEED = os.environ.get("FUZZ_SEED", "1")
#: The statuses a valid request may meet (a stale If-Match is a 412); `st run` in the project reads it too.
CONFIG = Path(__file__).resolve().parent.parent / "schemathesis.toml"


@contextmanager
def serving(app) -> Iterator[str]:
    """The app on a free local port, in a thread, for as long as the block runs."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_schemathesis_with_every_check_finds_nothing(app, tmp_path):
    """Generated requests never get a 5xx, answers match the document, invalid data is refused, valid data accepted."""
    with serving(app) as base_url:
        result = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
                "run", f"{base_url}/api/openapi.json",
                "--checks", "all",
                "--max-examples", str(EXAMPLES),
                "--seed", SEED,
                "--workers", "1",
                "--generation-database", "none",
                "--no-color",
                "--report-dir", str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    selected, total = map(int, re.search(r"Selected: (\d+)/(\d+)", output).groups())
    tested = int(re.search(r"Tested: (\d+)", output).group(1))
    assert tested == selected == total >= 6, output[-3000:]
    cases = int(re.search(r"(\d+) generated", output).group(1))
    logger.info("schemathesis sent %d cases to %d operations and found nothing", cases, tested)
    assert cases > 10 * tested
