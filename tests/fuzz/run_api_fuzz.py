"""`make fuzz`, API half: schemathesis against a real coordinator's /openapi.json.

Starts a coordinator process (on $REDIS_URL under a fresh key prefix, or an embedded Redis) on a
free loopback port, runs `schemathesis run` with every check and the stateful phase (links
inferred from the schema; the positive and negative data checks learn from fuzz_hooks.py the
rules the schema states only in words), prints the figures and exits non-zero on any failure
(a run that failed only inside schemathesis itself, never on a check of the server, runs once
more); the coordinator's log is printed when a run fails. The case budget is `--max-examples` per operation (FUZZ_EXAMPLES, default 60); FUZZ_MAX_TIME (seconds) bounds
the whole run, every phase still run: CI's `make test` runs FUZZ_EXAMPLES=5 FUZZ_MAX_TIME=40.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from tetherfed_coordinator.embedded import EmbeddedRedis, free_port


@contextlib.contextmanager
def coordinator(redis_url: str, log: Path) -> Iterator[str]:
    """A coordinator process on a free port, its output in `log`; its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {
        "TETHER_KEY_PREFIX": f"fuzz:{uuid.uuid4().hex[:8]}:",
        "TETHER_SCORER_PROCESSES": "0",
        "TETHER_LONG_POLL_MAX_S": "0.5",
        "TETHER_SSE_KEEPALIVE_S": "0.5",
    }
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
    ]
    sink = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        sink.close()


# Every check, positive_data_acceptance and negative_data_rejection included. A few rules live
# in model validators JSON Schema cannot state (unique layer names, ordered policy thresholds):
# the document states them in words and fuzz_hooks.py tells the checks which 422s those are.
HOOKS = Path(__file__).with_name("fuzz_hooks.py")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "positive_data_acceptance",
        "negative_data_rejection",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
        "use_after_free",
        "ensure_resource_availability",
    ]
)


def run(url: str, examples: int, seed: int, max_time_s: int | None = None) -> tuple[int, str]:
    """schemathesis over every operation, its output echoed; its exit code and output."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        "2",
        "--max-response-time",
        "30",
        # The decision stream never ends by design (a schema-valid request keeps it open until
        # the response-time bound fails it); its Last-Event-ID rule is tested in
        # tests/coordinator/test_schema_honesty.py. /ui/ serves pages, not the API.
        "--exclude-path-regex",
        "/decisions/stream|/ui/",
    ]
    if max_time_s is not None:
        cmd += ["--max-time", str(max_time_s)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    print(done.stdout, end="", flush=True)
    print(done.stderr, end="", file=sys.stderr, flush=True)
    return done.returncode, done.stdout + done.stderr


def tool_error_only(output: str) -> bool:
    """Whether a failed run failed only inside schemathesis or hypothesis (a "Runtime Error" such
    as CPython 3.11's "AST constructor recursion depth mismatch" while hypothesis describes a
    lambda) and not on a check of the server's answers: worth one more run, where a server error
    or a violated check never is."""
    return "Runtime Error" in output and "❌" not in output and "Server error" not in output


def fuzz(args: argparse.Namespace, log: Path) -> tuple[int, str]:
    """One schemathesis run against a fresh coordinator (on $REDIS_URL or an embedded Redis)."""
    url = os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(EmbeddedRedis()).url
        base = stack.enter_context(coordinator(url, log))
        code, output = run(base, args.examples, args.seed, args.max_time)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-80:]
        print("\n--- the coordinator's log, last lines ---\n" + "\n".join(tail), flush=True)
    return code, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", "60")))
    parser.add_argument("--seed", type=int, default=12)
    budget = os.environ.get("FUZZ_MAX_TIME")
    parser.add_argument("--max-time", type=int, default=int(budget) if budget else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        log = Path(folder) / "coordinator.log"
        code, output = fuzz(args, log)
        if code != 0 and tool_error_only(output):
            print("schemathesis failed inside itself, not on the server: running once more")
            code, _ = fuzz(args, log)
    return code


if __name__ == "__main__":
    sys.exit(main())
