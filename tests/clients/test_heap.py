"""keep_freed_memory(): freed tensors stay in the heap (their pages are reused, not faulted in
afresh), and a user's own glibc setting wins. Each case runs in a fresh interpreter, since the
setting is process-wide and this test process has tethered models already."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# Allocate and free a 256 MiB tensor (above glibc's largest adaptive mmap threshold, 32 MiB), and
# report how much of it the process still holds resident afterwards.
PROBE = """
import sys, torch
from tetherfed.tethers import keep_freed_memory, tether

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

mode = sys.argv[1]
kept = keep_freed_memory() if mode == "call" else None
if mode == "tether":
    tether(torch.nn.Linear(4, 4))
before = rss_mib()
x = torch.ones(64 << 20)
del x
print(kept, round(rss_mib() - before))
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_memory_is_returned_to_the_kernel_by_default() -> None:
    _, held = _probe("none")
    assert held < 64, f"{held} MiB of a freed 256 MiB tensor still resident"


@pytest.mark.parametrize("mode", ["call", "tether"])
def test_freed_memory_stays_in_the_heap_once_kept(mode: str) -> None:
    kept, held = _probe(mode)
    assert kept in {"True", "None"}
    assert held > 192, f"only {held} MiB of a freed 256 MiB tensor kept for reuse"


def test_the_users_own_malloc_setting_wins() -> None:
    kept, held = _probe("call", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "False"
    assert held < 64
