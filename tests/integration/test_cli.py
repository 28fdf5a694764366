"""`tetherfed federation create` against a real coordinator: idempotent, with named errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def tetherfed(*argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tetherfed.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_federation_create_is_idempotent_and_names_bad_input(
    coordinator_process: Callable[..., Any],
) -> None:
    url = coordinator_process().url
    first = tetherfed("federation", "create", "exp", "--policy", "seed", "--coordinator", url)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["policy"]["measure"] == "dot"
    again = tetherfed("federation", "create", "exp", "--policy", "seed", "--coordinator", url)
    assert again.returncode == 0 and json.loads(again.stdout)["name"] == "exp"
    bad = tetherfed("federation", "create", "x", "--policy", "fastest", "--coordinator", url)
    assert bad.returncode == 2 and "known: demo, default, seed, cka" in bad.stderr
    down = tetherfed("federation", "create", "x", "--coordinator", "http://127.0.0.1:9")
    assert down.returncode == 3 and "unreachable" in down.stderr
