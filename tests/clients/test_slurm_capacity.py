"""`tetherfed submit slurm` refuses a job array its partition cannot run at once, from `sinfo`'s
node list (`tetherfed.launch._slurm.capacity_problem`), and says so and submits when there is no
`sinfo` on the machine.

No Slurm runs here: the sinfo outputs below are written in the format the command asks for
(`sinfo --noheader -N -o "%N|%R|%c|%G|%t|%l"`: node, partition, CPUs, generic resources, compact
state, partition time limit; the fields and state codes of Slurm's sinfo manual), one line per
node and partition, as sinfo prints them. The command-line tests put an executable `sinfo` that
prints one of them first on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tetherfed.cli import main
from tetherfed.launch._slurm import (
    SINFO_FORMAT,
    SlurmPlan,
    capacity_problem,
    parse_sinfo,
)

# A CPU partition of two 32-CPU nodes, one of them drained; a GPU partition of 4-GPU nodes, one
# not responding (`*`) and one powered down by power saving (`~`, which Slurm boots on demand);
# a debug partition with a 30-minute limit.
SINFO = """\
cpu-001|cpu|32|(null)|mix|2-00:00:00
cpu-002|cpu|32|(null)|drain|2-00:00:00
gpu-001|gpu|64|gpu:a100:4(S:0-1)|alloc|1-00:00:00
gpu-002|gpu|64|gpu:a100:4(S:0-1)|idle*|1-00:00:00
gpu-003|gpu|64|gpu:a100:2,gpu:v100:2|idle~|1-00:00:00
dbg-001|debug|8|(null)|idle|30:00
big-001|long|128|gpu:8|idle|infinite
"""


def plan(
    partition: str, workers: int, cpus: int = 4, gpus: int = 0, time_min: int = 60
) -> SlurmPlan:
    return SlurmPlan(
        folder=Path("/shared/run"),
        redis_url="redis://db:6379/0",
        workers=workers,
        partition=partition,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        time_min=time_min,
    )


def test_sinfo_lines_are_read_with_gpus_states_and_limits() -> None:
    nodes = {n.name: n for n in parse_sinfo(SINFO)}
    assert nodes["gpu-001"].gpus == 4 and nodes["gpu-003"].gpus == 4 and nodes["cpu-001"].gpus == 0
    assert nodes["dbg-001"].time_limit_min == 30 and nodes["big-001"].time_limit_min is None
    assert nodes["cpu-001"].time_limit_min == 2880
    takes = {name for name, n in nodes.items() if n.takes_jobs}
    assert takes == {"cpu-001", "gpu-001", "gpu-003", "dbg-001", "big-001"}


@pytest.mark.parametrize(
    ("the_plan", "fits"),
    [
        (plan("cpu", workers=7, cpus=4), True),  # 32 CPUs: coordinator 2, then 7 × 4
        (plan("cpu", workers=8, cpus=4), False),  # the 8th task has no room: 2 + 8 × 4 > 32
        (plan("gpu", workers=2, cpus=8, gpus=4), True),  # one per 4-GPU node, two nodes up
        (plan("gpu", workers=3, cpus=8, gpus=4), False),  # gpu-002 does not respond
        (plan("gpu", workers=8, cpus=4, gpus=1), True),
        (plan("long", workers=8, cpus=15, gpus=1), True),  # 8 × 15 + 2 = 122 of 128
        (plan("long", workers=8, cpus=16, gpus=1), False),  # 8 × 16 leaves no 2 CPUs
        (plan("debug", workers=3, cpus=2, time_min=30), True),
    ],
)
def test_a_partition_holds_the_array_only_when_every_task_fits_at_once(
    the_plan: SlurmPlan, fits: bool
) -> None:
    problem = capacity_problem(the_plan, parse_sinfo(SINFO))
    assert (problem is None) == fits, problem


def test_what_is_missing_is_said_with_the_numbers() -> None:
    nodes = parse_sinfo(SINFO)
    problem = capacity_problem(plan("cpu", workers=8, cpus=4), nodes)
    assert problem == (
        "partition 'cpu' has 1 node(s) that take jobs (1 down, drained or not responding): room "
        "for 7 worker task(s) of 4 CPU besides the coordinator job's 2 CPUs; --workers 8 need to "
        "run at once: lower --workers, --cpus-per-worker or --gpus-per-worker, or use a larger "
        "partition"
    )
    problem = capacity_problem(plan("gpu", workers=3, cpus=8, gpus=4), nodes)
    assert problem is not None and "room for 2 worker task(s) of 8 CPU and 4 GPU" in problem
    assert capacity_problem(plan("debug", workers=1, time_min=31), nodes) == (
        "--time 31 min is over the limit of partition 'debug', 30 min"
    )
    assert capacity_problem(plan("gpus", workers=1), nodes) == (
        "no partition 'gpus' (sinfo lists: cpu, debug, gpu, long)"
    )
    problem = capacity_problem(plan("debug", workers=1, cpus=16, time_min=30), nodes)
    assert problem is not None and "room for 0 worker task(s) of 16 CPU" in problem


@pytest.mark.parametrize("line", ["node|p|x|(null)|idle|1:00:00", "node|p|4|idle|1:00:00"])
def test_an_unexpected_sinfo_line_is_named(line: str) -> None:
    with pytest.raises(ValueError, match="unexpected sinfo line") as caught:
        parse_sinfo(line)
    assert SINFO_FORMAT in str(caught.value)


def _sinfo_on_path(folder: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    """An executable `sinfo` first on PATH that prints `output` (and checks its arguments)."""
    folder.mkdir()
    script = folder / "sinfo"
    expected = f"--noheader -N -o {SINFO_FORMAT}"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$*" = "{expected}" ] || {{ echo "unexpected arguments: $*" >&2; exit 2; }}\n'
        f"cat <<'EOF'\n{output}EOF\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def _submit(folder: Path, workers: int, partition: str = "cpu") -> int:
    argv = ["submit", "slurm", "--workers", str(workers), "--cpus-per-worker", "4"]
    argv += ["--partition", partition, "--time", "1:00:00", "--folder", str(folder)]
    return main([*argv, "--redis-url", "redis://db.example:6379/0", "--dry-run"])


def test_submit_refuses_an_array_the_partition_cannot_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _sinfo_on_path(tmp_path / "bin", monkeypatch, SINFO)
    assert _submit(tmp_path / "run", workers=8) == 2  # EXIT_USAGE
    err = capsys.readouterr().err
    assert "the job array cannot run at once: partition 'cpu' has 1 node(s)" in err, err
    assert not (tmp_path / "run").exists(), "refused before anything was written"
    assert _submit(tmp_path / "run", workers=7) == 0
    assert "# ---- workers ----" in capsys.readouterr().out


def test_submit_without_sinfo_says_the_check_was_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sinfo here
    assert _submit(tmp_path / "run", workers=1000) == 0
    captured = capsys.readouterr()
    assert "sinfo is not available here: the partition's capacity was not checked" in captured.err
    assert "# ---- workers ----" in captured.out
