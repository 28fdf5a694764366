"""A wheel that works: build it, install it (not editable) into a fresh venv, and run the
commands a user runs from it, outside the source tree: `tetherfed bench --quick`, a built-in
example experiment, and `tetherfed up`."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with the wheel installed. Its dependencies come from this
    environment through a .pth file (no network); the package itself only from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
        ],
        tmp,
    )
    wheel = next((tmp / "dist").glob("tetherfed-*.whl"))
    run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], tmp)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(tmp / "venv")}))
    deps = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (purelib / "_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    python = tmp / "venv" / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        tmp,
    )
    return python.parent


def test_the_installed_package_is_the_wheel_not_the_source(installed: Path, tmp_path: Path) -> None:
    code = "import tetherfed, tetherfed_bench; print(tetherfed.__file__, tetherfed_bench.__file__)"
    where = run([str(installed / "python"), "-c", code], tmp_path).stdout
    assert str(ROOT) not in where and str(installed.parent) in where, where


@pytest.mark.timeout(300)
def test_bench_quick_runs_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    # One benchmark: this checks that bench/ ships and runs installed; test_bench.py runs every
    # quick benchmark (the same files) from the source tree, which would double ~3 minutes here.
    run([str(installed / "tetherfed"), "bench", "--quick", "scoring", "--json", str(out)], tmp_path)
    names = [json.loads(line)["name"] for line in out.read_text().splitlines()]
    assert names == ["scoring"], names


@pytest.mark.timeout(300)
def test_a_built_in_example_and_up_run_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    tetherfed = str(installed / "tetherfed")
    sets = [
        "--set",
        "experiment.repeats=1",
        "--set",
        "experiment.steps=6",
        "--set",
        'arms=["federated"]',
        "--set",
        "experiment.device='cpu'",
    ]
    done = run(
        [tetherfed, "experiment", "run", "tiny", "--out", str(tmp_path / "exp"), *sets], tmp_path
    )
    up = run(
        [
            tetherfed,
            "up",
            "--workers",
            "2",
            "--steps",
            "6",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "up"),
        ],
        tmp_path,
    )
    assert "1 finished" in done.stdout, done.stdout
    assert (tmp_path / "exp" / "results.csv").exists()
    assert "finished ok" in up.stdout, up.stdout
