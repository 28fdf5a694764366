"""`tetherfed submit slurm`: a coordinator job and a job array of workers on Slurm, through
submitit (the `tetherfed[slurm]` extra).

The coordinator job starts `tetherfed coordinator` on its node (Redis is the one given: a job
cannot host state that outlives it), creates the federation and writes its URL to
`<folder>/coordinator.json`. Each array task waits for that file, then runs the worker loop
in-process with its checkpoints in `<folder>/worker-<i>/` (a path every node sees). On
preemption or timeout submitit calls `checkpoint()`, which requeues the same task; it resumes
from `latest.pt` under the same worker id (`tetherfed worker --resume`). The command submits,
prints the job ids and exits; it never waits on the jobs.

Before submitting it asks `sinfo` whether the partition can run the coordinator job and every
worker task at once (`capacity_problem`) and refuses a submission that would leave tasks queued
behind the others; without `sinfo` on this machine it says so and submits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherfed._exits import EXIT_OK, CliError
from tetherfed.client._sdk import Client
from tetherfed.worker._options import (
    add_worker_args,
    at_least_one,
    options_argv,
    options_from_args,
)
from tetherfed_coordinator.embedded import die_with_parent, free_port
from tetherfed_coordinator.topology import parse_redis_url

from ._launch import create_federation, resolve_policy, wait_ready

COORDINATOR_FILE = "coordinator.json"
SUBMITIT_DIR = "submitit"  # submitit's own files (pickles, logs), per job id
WAIT_COORDINATOR_S = 3600.0  # a worker waits this long for the coordinator job to start
COORDINATOR_CPUS = 2  # the coordinator job's cpus_per_task (`job_parameters`)
# sinfo, one line per node and partition: name|partition|CPUs|generic resources|state|time limit
SINFO_FORMAT = "%N|%R|%c|%G|%t|%l"
# Node states (sinfo's compact %t, suffixes such as `*` (not responding) or `~` (powered off)
# aside) in which a node takes no new job: down, drained or draining, failing, in maintenance,
# invalid, future, unknown, not part of the cluster (Slurm's sinfo manual, "NODE STATE CODES").
NO_NEW_JOBS = {
    "down",
    "drain",
    "drained",
    "drng",
    "draining",
    "fail",
    "failg",
    "failing",
    "maint",
    "inval",
    "futr",
    "future",
    "unk",
    "unknown",
    "npc",
}


@dataclass(frozen=True)
class SlurmPlan:
    """What to submit. `time_min` is each job's time limit; `worker_args` are `tetherfed
    worker` options (task, steps, ...)."""

    folder: Path
    redis_url: str
    workers: int
    gpus_per_worker: int = 0
    partition: str | None = None
    time_min: int = 60
    account: str | None = None
    federation: str = "slurm"
    policy: str = "default"
    worker_args: list[str] = field(default_factory=list)
    cpus_per_worker: int = 4
    host: str = "0.0.0.0"  # the coordinator binds here; 127.0.0.1 for a one-machine run
    port: int = 8420


def parse_time(text: str) -> int:
    """Slurm `--time` (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) in whole minutes, at
    least 1; ValueError naming the format."""
    days, dash, rest = text.partition("-")
    if not dash:
        days, rest = "0", text
    try:
        parts = [int(p) for p in rest.split(":")]
        day_count = int(days)
    except ValueError:
        parts, day_count = [], 0
    if not 1 <= len(parts) <= 3 or min(parts) < 0 or day_count < 0:
        raise ValueError(f"--time {text!r}: use minutes, H:M:S or D-H:M:S, as sbatch does")
    if dash:  # D-H[:M[:S]]
        h, m, s = [*parts, 0, 0][:3]
    else:  # M, M:S, H:M:S
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return max(1, round(day_count * 1440 + h * 60 + m + s / 60))


# ---------------------------------------------------------------- what runs in the jobs
def advertised_url(host: str, port: int) -> str:
    """The URL other nodes reach a coordinator bound to `host` at: the node's name unless it
    binds a loopback address."""
    name = host if host.startswith("127.") or host == "localhost" else socket.gethostname()
    return f"http://{name}:{port}"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to `path` through a temporary file and a rename (readers never see half)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


class CoordinatorJob:
    """The coordinator job: `python -m tetherfed_coordinator` on this node until the job ends;
    the federation created, the URL in `<folder>/coordinator.json`."""

    def __init__(self, plan: SlurmPlan) -> None:
        self.plan = plan

    def __call__(self) -> int:
        plan = self.plan
        port = plan.port or free_port()
        url = advertised_url(plan.host, port)
        cmd = [
            sys.executable,
            "-m",
            "tetherfed_coordinator",
            "--host",
            plan.host,
            "--port",
            str(port),
            "--redis-url",
            plan.redis_url,
        ]
        with (plan.folder / "coordinator.log").open("ab") as log:
            # preexec_fn: the coordinator dies with this job step (no threads run here yet).
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,  # noqa: PLW1509
            )
        try:
            problem = wait_ready(url, proc, timeout_s=120)  # type: ignore[arg-type]
            if problem:
                raise RuntimeError(f"the coordinator did not start: {problem}")
            with Client(url) as client:
                create_federation(client, plan.federation, resolve_policy(plan.policy))
            write_json_atomic(plan.folder / COORDINATOR_FILE, {"url": url, "pid": proc.pid})
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)

    def checkpoint(self) -> Any:
        """Requeued on timeout or preemption: a new job, on any node, writes its new URL."""
        import submitit  # noqa: PLC0415 (the optional slurm extra)

        return submitit.helpers.DelayedSubmission(self)


def wait_for_coordinator(folder: Path, timeout_s: float = WAIT_COORDINATOR_S) -> str:
    """The URL the coordinator job wrote, once it is there; TimeoutError after `timeout_s`."""
    path = folder / COORDINATOR_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return str(json.loads(path.read_text())["url"])
        time.sleep(1.0)
    raise TimeoutError(f"no {path} after {timeout_s:.0f} s: is the coordinator job running?")


class WorkerJob:
    """One array task: the worker loop in-process, checkpoints in `<folder>/worker-<i>`,
    resumed from them (same worker id) when requeued."""

    def __init__(self, plan: SlurmPlan) -> None:
        self.plan = plan

    def argv(self, index: int, url: str) -> list[str]:
        """The `tetherfed worker` command line of task `index`."""
        plan = self.plan
        return [
            "worker",
            "--coordinator",
            url,
            "--federation",
            plan.federation,
            "--name",
            f"worker-{index}",
            "--seed",
            str(index),
            "--device",
            "cuda" if plan.gpus_per_worker else "cpu",
            "--checkpoint-dir",
            str(plan.folder / f"worker-{index}"),
            "--resume",
            *plan.worker_args,
        ]

    def __call__(self, index: int) -> int:
        from tetherfed.worker import main  # noqa: PLC0415 (the task runs the worker in-process)

        argv = self.argv(index, wait_for_coordinator(self.plan.folder))
        code = main(argv[1:])  # argv: `worker …`, as `tetherfed` takes it
        if code:
            raise RuntimeError(f"worker {index} exited with code {code}")
        return code

    def checkpoint(self, index: int) -> Any:
        """Requeue this task on timeout or preemption; it resumes from `latest.pt`."""
        import submitit  # noqa: PLC0415 (the optional slurm extra)

        return submitit.helpers.DelayedSubmission(self, index)


# ---------------------------------------------------------------- what the partition can hold
@dataclass(frozen=True)
class SlurmNode:
    """One node of a partition as `sinfo -N -o SINFO_FORMAT` lists it."""

    name: str
    partition: str
    cpus: int
    gpus: int
    state: str
    time_limit_min: int | None  # the partition's; None: infinite

    @property
    def takes_jobs(self) -> bool:
        """Whether the node can start a new job (not down, drained, failing, …; one that does
        not respond, `*`, neither)."""
        base = self.state.rstrip("*~#!%$@^-+")
        return not self.state.endswith("*") and base not in NO_NEW_JOBS


def _gpus(gres: str) -> int:
    """GPUs in a node's generic resources (`gpu:4`, `gpu:a100:2(S:0-1)`, `gpu:a100:2,gpu:v100:1`,
    `(null)`)."""
    total = 0
    for entry in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", entry).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> list[SlurmNode]:
    """The nodes of `sinfo --noheader -N -o SINFO_FORMAT` output; ValueError naming a line
    that does not read so."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.strip().split("|")
        if len(fields) != 6 or not fields[2].isdigit():
            raise ValueError(f"unexpected sinfo line {line!r} (format {SINFO_FORMAT})")
        name, partition, cpus, gres, state, limit = fields
        minutes = None if limit.strip() in ("infinite", "UNLIMITED", "n/a") else parse_time(limit)
        nodes.append(SlurmNode(name, partition, int(cpus), _gpus(gres), state.strip(), minutes))
    return nodes


def _tasks_on(node: SlurmNode, cpus: int, gpus: int) -> int:
    """Worker tasks of `cpus` CPUs and `gpus` GPUs each that fit on `node` at once."""
    fit = node.cpus // cpus
    return min(fit, node.gpus // gpus) if gpus else fit


def capacity_problem(plan: SlurmPlan, nodes: Sequence[SlurmNode]) -> str | None:
    """Why the plan's partition cannot run its coordinator job and all its worker tasks at once
    (a federation needs its workers together: tasks that do not fit would wait in the queue while
    the others train alone), or why its time limit is over the partition's; None when it can.

    Counts the partition's nodes that take jobs, whatever they run now (their jobs end), each
    task on one node (`nodes=1`, `gpus_per_node`), the coordinator's COORDINATOR_CPUS on the node
    where they cost the fewest worker tasks. Limits sinfo does not list (QOS, per-user or
    per-account limits, reservations) are not checked."""
    known = sorted({n.partition for n in nodes})
    if plan.partition is None:
        return None
    mine = [n for n in nodes if n.partition == plan.partition]
    if not mine:
        return f"no partition {plan.partition!r} (sinfo lists: {', '.join(known) or 'none'})"
    limit = mine[0].time_limit_min
    if limit is not None and plan.time_min > limit:
        return (
            f"--time {plan.time_min} min is over the limit of partition {plan.partition!r}, "
            f"{limit} min"
        )
    usable = [n for n in mine if n.takes_jobs]
    out = len(mine) - len(usable)
    cpus, gpus = plan.cpus_per_worker, plan.gpus_per_worker
    per_node = [_tasks_on(n, cpus, gpus) for n in usable]
    room = sum(per_node)
    hosts = [
        fit
        - _tasks_on(
            SlurmNode(n.name, n.partition, n.cpus - COORDINATOR_CPUS, n.gpus, "", 0), cpus, gpus
        )
        for n, fit in zip(usable, per_node, strict=True)
        if n.cpus >= COORDINATOR_CPUS
    ]
    if not hosts:
        room = -1  # nowhere for the coordinator
    else:
        room -= min(hosts)
    if room >= plan.workers:
        return None
    task = f"{cpus} CPU" + (f" and {gpus} GPU" if gpus else "")
    nodes_text = f"{len(usable)} node(s) that take jobs" + (
        f" ({out} down, drained or not responding)" if out else ""
    )
    if room < 0:
        return (
            f"partition {plan.partition!r} has {nodes_text}, none with the coordinator job's "
            f"{COORDINATOR_CPUS} CPUs"
        )
    return (
        f"partition {plan.partition!r} has {nodes_text}: room for {room} worker task(s) of "
        f"{task} besides the coordinator job's {COORDINATOR_CPUS} CPUs; --workers "
        f"{plan.workers} need to run at once: lower --workers, --cpus-per-worker or "
        "--gpus-per-worker, or use a larger partition"
    )


def sinfo_nodes(run: Any = subprocess.run) -> list[SlurmNode] | None:
    """Every partition's nodes as this machine's `sinfo` lists them; None when there is no
    `sinfo` here (or it fails: the check is then skipped, never the submission)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = run(
            ["sinfo", "--noheader", "-N", "-o", SINFO_FORMAT],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_sinfo(done.stdout)


def check_capacity(plan: SlurmPlan) -> str | None:
    """Refuse (ValueError, saying what is needed and what the partition has) a submission the
    partition cannot run at once; a note (returned) when `sinfo` is not here to ask."""
    nodes = sinfo_nodes()
    if nodes is None:
        return "sinfo is not available here: the partition's capacity was not checked"
    problem = capacity_problem(plan, nodes)
    if problem is not None:
        raise ValueError(problem)
    return None


# ---------------------------------------------------------------- submitting
def job_parameters(plan: SlurmPlan, role: str) -> dict[str, Any]:
    """sbatch parameters (submitit's SlurmExecutor names) of the coordinator or the workers."""
    params: dict[str, Any] = {
        "job_name": f"tetherfed-{role}",
        "time": plan.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "partition": plan.partition,
        "account": plan.account,
    }
    if role == "workers":
        params |= {"cpus_per_task": plan.cpus_per_worker, "array_parallelism": plan.workers}
        if plan.gpus_per_worker:
            params["gpus_per_node"] = plan.gpus_per_worker
    else:
        params["cpus_per_task"] = 2
    return {k: v for k, v in params.items() if v is not None}


def sbatch_scripts(plan: SlurmPlan) -> dict[str, str]:
    """The sbatch scripts `submit` would send (coordinator, workers), as submitit writes them."""
    from submitit.slurm.slurm import _make_sbatch_string  # noqa: PLC0415 (optional extra)

    folder = plan.folder / SUBMITIT_DIR / "%j"
    command = f"{sys.executable} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    out = {}
    for role in ("coordinator", "workers"):
        params = job_parameters(plan, role)
        if role == "workers":
            params["map_count"] = plan.workers
        out[role] = _make_sbatch_string(command=command, folder=folder, **params)
    return out


@dataclass(frozen=True)
class Submitted:
    """Job ids of one submission (the workers' are the array's tasks)."""

    coordinator: str
    workers: list[str]
    jobs: list[Any] = field(repr=False, default_factory=list)


def _executor(plan: SlurmPlan, role: str, cluster: str) -> Any:
    import submitit  # noqa: PLC0415 (the optional slurm extra)

    folder = plan.folder / SUBMITIT_DIR / "%j"
    if cluster == "local":  # this machine (tests, a try-out): no sbatch parameters apply
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=plan.time_min)
        return local
    slurm = submitit.SlurmExecutor(folder=folder)
    slurm.update_parameters(**job_parameters(plan, role))
    return slurm


def submit(plan: SlurmPlan, cluster: str = "slurm") -> Submitted:
    """Submit the coordinator job and the worker array (`cluster`: slurm, or local to run both
    on this machine with submitit's LocalExecutor); returns their job ids."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    (plan.folder / COORDINATOR_FILE).unlink(missing_ok=True)
    write_json_atomic(plan.folder / "config.json", _config(plan))
    coordinator = _executor(plan, "coordinator", cluster).submit(CoordinatorJob(plan))
    workers = _executor(plan, "workers", cluster).map_array(WorkerJob(plan), range(plan.workers))
    return Submitted(
        coordinator=str(coordinator.job_id),
        workers=[str(job.job_id) for job in workers],
        jobs=[coordinator, *workers],
    )


def _config(plan: SlurmPlan) -> dict[str, Any]:
    return {
        "engine": "slurm",
        "federation": plan.federation,
        "policy": plan.policy,
        "redis_url": plan.redis_url,
        "time_min": plan.time_min,
        "workers": [
            {
                "index": i,
                "name": f"worker-{i}",
                "seed": i,
                "group": plan.federation,
                "argv": WorkerJob(plan).argv(i, "<coordinator>"),
            }
            for i in range(plan.workers)
        ],
    }


# ---------------------------------------------------------------- command line
def add_submit_parser(sub: Any) -> None:
    """Add `tetherfed submit slurm` to cli.py's subparsers."""
    submit_parser = sub.add_parser("submit", help="submit a federation to a batch scheduler")
    engines = submit_parser.add_subparsers(dest="engine", required=True)
    p = engines.add_parser("slurm", help="a coordinator job and a worker job array (submitit)")
    p.add_argument(
        "--workers", type=at_least_one, required=True, help="array tasks (one worker each)"
    )
    p.add_argument("--gpus-per-worker", type=int, default=0)
    p.add_argument("--cpus-per-worker", type=at_least_one, default=4)
    p.add_argument("--partition", required=True)
    p.add_argument("--time", required=True, help="each job's limit: minutes, H:M:S or D-H:M:S")
    p.add_argument("--account", default=None)
    p.add_argument(
        "--redis-url",
        required=True,
        help="Redis all jobs share (a job cannot host it: it ends with the job)",
    )
    p.add_argument(
        "--folder",
        type=Path,
        required=True,
        help="shared folder every node sees: URL file, checkpoints, logs",
    )
    p.add_argument("--federation", default="slurm")
    p.add_argument("--policy", default="default", help="preset (default, seed, demo) or JSON")
    p.add_argument("--port", type=int, default=8420, help="coordinator port on its node")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit none")
    add_worker_args(p)
    p.set_defaults(handler=run_submit_slurm)


def plan_from_args(args: argparse.Namespace) -> SlurmPlan:
    """The SlurmPlan of parsed `tetherfed submit slurm` arguments; ValueError when invalid."""
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: need at least one")
    return SlurmPlan(
        folder=args.folder.resolve(),
        redis_url=args.redis_url,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        partition=args.partition,
        time_min=parse_time(args.time),
        account=args.account,
        federation=args.federation,
        policy=args.policy,
        worker_args=options_argv(options_from_args(args)),
        cpus_per_worker=args.cpus_per_worker,
        port=args.port,
    )


def run_submit_slurm(args: argparse.Namespace) -> int:
    """`tetherfed submit slurm`: print the scripts (--dry-run) or submit and print job ids."""
    try:
        parse_redis_url(args.redis_url)
        plan = plan_from_args(args)
    except ValueError as error:
        raise CliError(str(error)) from error
    try:
        note = check_capacity(plan)
    except ValueError as error:
        raise CliError(f"the job array cannot run at once: {error}") from error
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        for role, text in sbatch_scripts(plan).items():
            print(f"# ---- {role} ----\n{text}")
        return EXIT_OK
    done = submit(plan)
    print(f"coordinator job {done.coordinator}")
    print(f"worker jobs {' '.join(done.workers)}")
    print(f"coordinator URL will be in {plan.folder / COORDINATOR_FILE}")
    return EXIT_OK
