"""Run benchmarks and write one JSON line each.

tetherfed bench [NAME ...] [--quick] [--json FILE]
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ALL = [
    "scoring",
    "ingest",
    "latency",
    "overhead",
    "load",
    "round",
    "load-1000",
    "models",
    "sync-rounds",
]


def run_one(name: str, quick: bool) -> list[dict[str, Any]]:
    """Run benchmark `name` (module <this package>.<name with _ for ->, function run(quick)
    returning one row or a list of rows)."""
    module = importlib.import_module(f".{name.replace('-', '_')}", __package__)
    started = time.monotonic()
    result = module.run(quick=quick)
    rows: list[dict[str, Any]] = result if isinstance(result, list) else [result]
    for row in rows:
        row.setdefault("params", {})["wall_s"] = round(time.monotonic() - started, 2)
        # A quick row's `passed` judges quick sizes against the full targets: it says nothing
        # about the targets, and the flag says so in the row itself.
        row["params"]["quick"] = quick
    return rows


def main(names: Sequence[str], quick: bool = False, json_path: Path | None = None) -> int:
    """Run the named benchmarks (all by default); exit 1 if any raised, else 0.

    A missed target is reported in its line (`"passed": false`), not as a failure of the run.
    """
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(ALL)}", file=sys.stderr)
        return 2
    if json_path is not None:  # checked before minutes of benchmarks, not after the first
        try:
            json_path.open("a").close()
        except OSError as exc:
            print(f"cannot write --json {json_path}: {exc.strerror}", file=sys.stderr)
            return 2
    failed = False
    for name in names or ALL:
        print(f"# {name} ...", file=sys.stderr, flush=True)
        try:
            results = run_one(name, quick)
        except Exception as error:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            results = [{"name": name, "error": f"{type(error).__name__}: {error}", "passed": False}]
            failed = True
        for result in results:
            text = json.dumps(result)
            print(text, flush=True)
            if json_path is not None:
                with json_path.open("a") as out:
                    out.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([a for a in args if not a.startswith("--")], quick="--quick" in args))
