"""The Ray engine (`tetherfed up --engine ray`, `tetherfed experiment run --engine ray`, the
`tetherfed[ray]` extra): the launcher's `Engine` seam on a Ray cluster the user runs.

- Coordinator replicas are actors (`tetherfed_coordinator.replica`), one per bundle of a placement
  group with strategy SPREAD, each running `python -m tetherfed_coordinator` on its node against the
  one Redis given (`--redis-url`: an embedded Redis would live on one node and die with it, so the
  engine refuses to run without one). Workers get every replica's URL and fail over between them
  (`tetherfed.Client` takes several URLs).
- Each worker is an actor (`WorkerActor`) holding whole GPUs (`num_gpus`) that runs the worker
  loop in-process (`tetherfed worker …`, not a subprocess). Ray restarts an actor that dies
  (`max_restarts`) and re-runs its call; the new incarnation resumes from `latest.pt` in its
  checkpoint folder under the same worker id. Checkpoints and logs go into the run folder
  (`--out`), which therefore must be on storage every node sees (NFS, a shared home).
- The driver (this process) reads each worker's JSON lines back from its actor, so the run
  folder is the one a local run writes (see `_launch`).
- Stopping (the end of the run, Ctrl-C, SIGTERM) kills every actor the engine started and removes
  its placement group; the Ray cluster itself stays up.
- A run the cluster cannot hold is refused before anything starts (`check_capacity`, against the
  cluster's total resources: an experiment checks the most workers its runs have at once). A
  worker actor that still cannot be scheduled (a node was lost, another job holds the CPUs) is
  shown `pending` with the reason (`pending_reason`: what it waits for, what the cluster has
  free) and fails the run after `pending_timeout_s` (`--pending-timeout`) instead of waiting for
  ever.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tetherfed._exits import EXIT_FAILED

from ._launch import LocalEngine

NAMESPACE = "tetherfed"
MAX_RESTARTS = 3  # an actor that died this often stays dead: the run fails
START_TIMEOUT_S = 180.0  # actors (and their imports) starting on a loaded cluster
PUMP_EVERY_S = 0.5  # how often the driver reads a worker's new JSON lines
KILLED = -9  # returncode of an actor the engine killed (as SIGKILL for a local process)
PENDING_TIMEOUT_S = 300.0  # a worker actor waiting this long for resources fails the run
PENDING_AFTER_S = 5.0  # an actor not created this long may be waiting for resources: look
CHECK_EVERY_S = 1.0  # how often a waiting actor's state and the cluster's resources are read
WAITING = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING")  # Ray's actor states


class EngineRefused(ValueError):
    """An engine cannot run as asked (e.g. `--engine ray` without `--redis-url`, or without the
    `ray` package); the CLI answers EXIT_USAGE with the message."""


class EngineFailed(RuntimeError):
    """The engine could not start what it was asked to (no Ray cluster at the address, the
    cluster cannot place the replicas, a replica's coordinator did not start)."""


def pending_reason(
    need: Mapping[str, float], available: Mapping[str, float], total: Mapping[str, float]
) -> str | None:
    """Why an actor that needs `need` (resource → amount, e.g. {"CPU": 1}) cannot be placed on a
    cluster with `available` free of `total`: "waiting for 1 CPU: the cluster has 0 of 2 free";
    None when every resource it needs is free. Only the first resource short is named."""
    for resource, amount in need.items():
        if amount <= 0:
            continue
        free = available.get(resource, 0.0)
        if free + 1e-9 < amount:
            return (
                f"waiting for {amount:g} {resource}: the cluster has {max(free, 0.0):g} of "
                f"{total.get(resource, 0.0):g} free"
            )
    return None


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415 (the optional ray extra)
    except ImportError:
        raise EngineRefused(
            "--engine ray needs the ray package: pip install 'tetherfed[ray]'"
        ) from None
    return ray


# -- what runs inside the actors -----------------------------------------------------------------


class _LineSink(io.TextIOBase):
    """A text stream that keeps whole lines in a list (the worker's JSON lines)."""

    def __init__(self, lines: list[str]) -> None:
        self._lines, self._part = lines, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *done, self._part = (self._part + text).split("\n")
        self._lines.extend(done)
        return len(text)


class WorkerActor:
    """One worker in a Ray actor: `tetherfed <argv>` in-process, stdout kept as lines (read by
    the driver with `read`), stderr and logging appended to `log` (in the shared run folder).

    A restarted incarnation (Ray's `max_restarts`) adds `--resume`: the worker continues from
    `latest.pt` under its worker id. Needs `max_concurrency` ≥ 2 so `read` answers while `run`
    trains."""

    def __init__(self, argv: list[str], log: str, env: dict[str, str]) -> None:
        import ray  # noqa: PLC0415 (inside the actor: ray is there)

        self.argv, self.log, self.env = list(argv), Path(log), dict(env)
        self.lines: list[str] = []
        self.incarnation = uuid.uuid4().hex
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def pid(self) -> int:
        """This incarnation's process id."""
        return os.getpid()

    def read(self, offset: int) -> tuple[str, list[str]]:
        """(incarnation, stdout lines from `offset` on): a new incarnation starts at 0."""
        return self.incarnation, self.lines[offset:]

    def run(self) -> int:
        """Run the worker to its end; its exit code. RuntimeError when the run folder is not
        visible on this node."""
        from tetherfed.worker import main  # noqa: PLC0415 (torch only inside the actor)

        if not self.log.parent.is_dir():
            raise RuntimeError(
                f"the run folder {self.log.parent} is not visible on this node: --out must be "
                "on storage every node of the Ray cluster sees"
            )
        argv = [*self.argv, "--resume"] if self.restarted else self.argv
        os.environ.update(self.env)  # this process runs only this worker
        with (
            self.log.open("a") as err,
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(_LineSink(self.lines)),
        ):
            logging.basicConfig(
                level=logging.INFO,
                stream=err,
                force=True,
                format="%(asctime)s %(name)s %(levelname)s %(message)s",
            )
            if self.restarted:
                logging.getLogger("tetherfed.ray").warning(
                    "actor restarted in process %d: resuming from the checkpoint", os.getpid()
                )
            return int(main(argv[1:]))  # argv: `worker …`, as `tetherfed` takes it


# -- driver-side handles (the launcher's `Process`) ----------------------------------------------


class RayWorker:
    """A worker actor as the launcher sees a process: `poll`, `returncode`, `pid`, and `stdout`
    (a pipe a thread fills with the actor's JSON lines, through restarts).

    While the actor waits for resources, `waiting` says why (`pending_reason`); once it has
    waited `pending_timeout_s`, `poll` kills it and answers EXIT_FAILED with the reason in
    `failure` (and in the worker's log). `need` is what the actor asks of the cluster."""

    def __init__(
        self,
        ray: Any,
        handle: Any,
        name: str,
        log: Path,
        need: Mapping[str, float] | None = None,
        pending_timeout_s: float = PENDING_TIMEOUT_S,
    ) -> None:
        self.ray, self.handle, self.name, self.log = ray, handle, name, log
        self.need = dict(need or {})
        self.pending_timeout_s = pending_timeout_s
        self.returncode: int | None = None
        self.waiting: str | None = None  # why the actor is not running yet (None: it is)
        self.failure: str | None = None  # why the engine gave the actor up
        self._pid_ref: Any = handle.pid.remote()
        self._pid: int | None = None
        self._created = time.monotonic()
        self._waiting_since: float | None = None
        self._next_check = self._created + PENDING_AFTER_S
        self._check = threading.Lock()  # poll() runs on the launcher's and the pump's threads
        self.ref = handle.run.remote()
        read_fd, write_fd = os.pipe()
        self.stdout: IO[str] | None = os.fdopen(read_fd, "r")
        self._sink = os.fdopen(write_fd, "w")
        self._done = threading.Event()
        self._pump = threading.Thread(target=self._forward, name=f"ray-{name}", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        """The actor's process id (its first incarnation's); 0 while it has not started within
        PENDING_AFTER_S (asked again next time: a pending actor must not hold up the launcher)
        and when it never started."""
        if self._pid is None:
            try:
                self._pid = int(self.ray.get(self._pid_ref, timeout=PENDING_AFTER_S))
            except self.ray.exceptions.GetTimeoutError:
                return 0
            except Exception:  # any failure to start: no pid
                self._pid = 0
        return self._pid

    def poll(self) -> int | None:
        """None while `run` goes (restarts included); else its exit code (1 when it raised, the
        actor died for good, or it waited `pending_timeout_s` for resources; the reason
        appended to the worker's log)."""
        if self.returncode is not None:
            return self.returncode
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            self._check_pending()
            return self.returncode
        try:
            self.returncode = int(self.ray.get(self.ref))
        except Exception as exc:  # RayTaskError, RayActorError: failed
            self.returncode = EXIT_FAILED
            with contextlib.suppress(OSError), self.log.open("a") as log:
                log.write(f"ray: the worker actor failed: {exc}\n")
        return self.returncode

    def _state(self) -> str | None:
        """The actor's state in Ray's actor table (ALIVE, PENDING_CREATION, RESTARTING, …), read
        from the GCS; when that cannot be read, ALIVE once its first call answered, else
        PENDING_CREATION (so an actor is looked at only until it first runs)."""
        with contextlib.suppress(Exception):
            from ray._private.state import actors  # noqa: PLC0415 (no public GCS reader)

            state = actors(actor_id=self.handle._actor_id.hex()).get("State")
            if isinstance(state, str):
                return state
        ready, _ = self.ray.wait([self._pid_ref], timeout=0)
        return "ALIVE" if ready else "PENDING_CREATION"

    def _check_pending(self) -> None:
        """Set `waiting` while the actor cannot be scheduled, clear it once it runs; after
        `pending_timeout_s` of waiting, kill it and fail (`failure`, `returncode`)."""
        now = time.monotonic()
        if now < self._next_check or not self._check.acquire(blocking=False):
            return
        try:
            self._next_check = now + CHECK_EVERY_S
            reason = None
            if self._state() in WAITING:
                reason = pending_reason(
                    self.need, self.ray.available_resources(), self.ray.cluster_resources()
                )
            if reason is None:  # running, or starting on resources it holds
                self.waiting, self._waiting_since = None, None
                return
            self.waiting = reason
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < self.pending_timeout_s:
                return
            self.failure = (
                f"{self.name}: its Ray actor could not be scheduled for "
                f"{self.pending_timeout_s:g} s, {reason}; free resources on the cluster, add "
                "nodes, or lower --cpus-per-worker or --gpus-per-worker (--pending-timeout "
                "waits longer, e.g. for an autoscaler)"
            )
            with contextlib.suppress(Exception):
                self.ray.kill(self.handle, no_restart=True)
            with contextlib.suppress(OSError), self.log.open("a") as log:
                log.write(f"ray: {self.failure}\n")
            self.returncode = EXIT_FAILED
        except Exception:  # the GCS did not answer: look again next time
            pass
        finally:
            self._check.release()

    def release(self) -> None:
        """End a finished worker's actor once its last lines are read, so its CPUs (and GPUs)
        go back to the cluster while the run goes on."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.handle, no_restart=True)

    def _forward(self) -> None:
        incarnation, offset = None, 0
        try:
            while True:
                finished = self._done.is_set() or self.poll() is not None
                with contextlib.suppress(Exception):  # restarting or gone: try again next time
                    seen, lines = self.ray.get(self.handle.read.remote(offset), timeout=30)
                    if seen != incarnation:
                        incarnation, offset = seen, 0
                        seen, lines = self.ray.get(self.handle.read.remote(0), timeout=30)
                    offset += len(lines)
                    self._sink.writelines(line + "\n" for line in lines)
                    self._sink.flush()
                if finished:
                    self.release()
                    return
                self._done.wait(PUMP_EVERY_S)
        except (BrokenPipeError, ValueError):  # the launcher closed its end
            return
        finally:
            with contextlib.suppress(OSError):
                self._sink.close()

    def kill(self) -> None:
        """Kill the actor for good (no restart); the pipe closes once the last lines are read."""
        if self.poll() is None:
            with contextlib.suppress(Exception):
                self.ray.kill(self.handle, no_restart=True)
            self.returncode = KILLED
        self._done.set()
        self._pump.join(timeout=35)


class RayCoordinators:
    """The coordinator replicas as one launcher `Process`: `url` lists every replica's URL
    (comma-separated, as `tetherfed.Client` takes it); `poll` answers once one replica's
    coordinator exited by itself or its actor died for good."""

    def __init__(self, ray: Any, handles: list[Any], urls: list[str], pids: list[int]) -> None:
        self.ray, self.handles = ray, handles
        self.url = ",".join(urls)
        self.pid = pids[0]
        self.returncode: int | None = None
        self.stdout = None
        self._watch = [h.wait.remote() for h in handles]

    def poll(self) -> int | None:
        """None while every replica serves."""
        if self.returncode is not None:
            return self.returncode
        ready, _ = self.ray.wait(self._watch, timeout=0)
        if ready:
            try:
                self.returncode = int(self.ray.get(ready[0]))
            except Exception:  # the actor died for good
                self.returncode = EXIT_FAILED
        return self.returncode

    def kill(self) -> None:
        """Kill every replica (and so its coordinator process)."""
        if self.poll() is None:
            self.returncode = KILLED
        for handle in self.handles:
            with contextlib.suppress(Exception):
                self.ray.kill(handle, no_restart=True)


# -- the engine ----------------------------------------------------------------------------------


@dataclass
class RayEngine:
    """Workers and coordinator replicas as actors on the Ray cluster at `address` ('auto': the
    one this node belongs to; or HOST:PORT of its head's GCS).

    `gpus_per_worker` whole GPUs per worker actor (0: CPU workers), `cpus_per_worker` logical
    CPUs each; `coordinators` replicas, 1 CPU each, spread over nodes; `redis_url` the Redis all
    replicas share (required). Call `connect()` first and `close()` at the end."""

    address: str = "auto"
    redis_url: str | None = None
    coordinators: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: float = 1.0
    workers: int | None = None  # when known (`up`): checked against the cluster at connect()
    name: str = "ray"
    start_timeout_s: float = START_TIMEOUT_S
    pending_timeout_s: float = PENDING_TIMEOUT_S  # a worker actor waiting longer fails the run
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _ray: Any = field(default=None, repr=False)
    _groups: list[Any] = field(default_factory=list, repr=False)
    _started: list[RayWorker | RayCoordinators] = field(default_factory=list, repr=False)
    _count: int = 0

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise EngineRefused(
                "--engine ray needs --redis-url: the coordinator replicas and the workers run "
                "on several machines, and an embedded Redis lives on one machine and ends with "
                "its process. Name a Redis every node reaches, e.g. --redis-url "
                "redis://db.example:6379/0 (see the docs: tutorials/ray-and-slurm.md)"
            )
        if self.coordinators < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise EngineRefused("--coordinators must be ≥ 1, --gpus/--cpus-per-worker ≥ 0")
        if not self.pending_timeout_s > 0:
            raise EngineRefused(f"--pending-timeout must be > 0 s, not {self.pending_timeout_s}")

    def connect(self) -> None:
        """Join the Ray cluster as a driver (EngineRefused without ray, EngineFailed when no
        cluster answers at `address`)."""
        ray = _ray()
        try:
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineFailed(f"no Ray cluster at --address {self.address}: {exc}") from exc
        self._ray = ray
        if self.workers is not None:
            self.check_capacity(self.workers, ray.cluster_resources())

    def check_sweep(self, run_workers: Iterable[int], jobs: int) -> None:
        """`check_capacity` for an experiment: its runs share one set of coordinator replicas
        and go `jobs` at a time, so the most workers at once are those of its `jobs` largest
        runs. Checked once, before the sweep (a sweep refused after hours of runs would waste
        them); a run that then cannot be placed shows its workers pending and fails after
        `pending_timeout_s`. Needs `connect()` first."""
        sizes = sorted(run_workers, reverse=True)[: max(jobs, 1)]
        if sizes and self._ray is not None:
            at_once = f"{len(sizes)} run(s) at once (--jobs {jobs})" if len(sizes) > 1 else ""
            self.check_capacity(sum(sizes), self._ray.cluster_resources(), at_once)

    def check_capacity(self, workers: int, cluster: dict[str, float], why: str = "") -> None:
        """Refuse (EngineRefused, saying what is needed and what the cluster has) a run whose
        replicas and workers cannot all hold their resources at once: the actors that do not
        fit would wait for ever, and a federation needs its workers together. `why` says where
        the worker count comes from when it is not one run's."""
        need = {
            "CPU": self.coordinators * 1.0 + workers * self.cpus_per_worker,
            "GPU": float(workers * self.gpus_per_worker),
        }
        short = {k: v for k, v in need.items() if v > cluster.get(k, 0.0) + 1e-9}
        if short:
            have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in short)
            raise EngineRefused(
                f"the Ray cluster has {have}; this run needs "
                f"{need['CPU']:g} CPU ({self.coordinators} coordinator replica(s) × 1 + "
                f"{workers} worker(s) × {self.cpus_per_worker:g}"
                + (f", for {why}" if why else "")
                + ")"
                + (f" and {need['GPU']:g} GPU" if need["GPU"] else "")
                + ": add nodes, or lower "
                + ("--jobs, " if why else "")
                + "--workers, --cpus-per-worker or --gpus-per-worker"
            )

    def device_count(self, choice: str) -> int:
        """1 when workers get GPUs (Ray shows each actor its own as cuda:0), else 0."""
        return 0 if choice == "cpu" or not self.gpus_per_worker else 1

    def _label(self, what: str) -> str:
        self._count += 1
        return f"{self.session}-{self._count}/{what}"

    def start_coordinator(self, out: Path, port: int, redis_url: str | None) -> RayCoordinators:
        """The replicas, each on `port` of its node, ready; logs in out/coordinator.log (replica
        0) and out/coordinator-<k>.log. EngineFailed when they cannot be placed or started."""
        ray = self._ray
        from ray.util.placement_group import placement_group  # noqa: PLC0415 (optional extra)
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            PlacementGroupSchedulingStrategy,
        )

        group = placement_group([{"CPU": 1}] * self.coordinators, strategy="SPREAD")
        self._groups.append(group)
        try:
            ray.get(group.ready(), timeout=self.start_timeout_s)
        except Exception as exc:
            why = None
            with contextlib.suppress(Exception):
                why = pending_reason(
                    {"CPU": float(self.coordinators)},
                    ray.available_resources(),
                    ray.cluster_resources(),
                )
            raise EngineFailed(
                f"the cluster cannot place {self.coordinators} coordinator "
                f"replicas of 1 CPU each: {why or exc}"
            ) from exc
        from tetherfed_coordinator.replica import CoordinatorReplica  # noqa: PLC0415

        actor = ray.remote(CoordinatorReplica)
        handles = []
        for k in range(self.coordinators):
            log = out / ("coordinator.log" if k == 0 else f"coordinator-{k}.log")
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k)
            handles.append(
                actor.options(
                    num_cpus=1,
                    scheduling_strategy=strategy,
                    max_restarts=MAX_RESTARTS,
                    max_task_retries=MAX_RESTARTS,
                    name=self._label(f"coordinator-{k}"),
                ).remote(redis_url or self.redis_url, port, str(log), self.start_timeout_s)
            )
        try:
            answers = ray.get([h.address.remote() for h in handles], timeout=self.start_timeout_s)
        except Exception as exc:
            for handle in handles:
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
            raise EngineFailed(f"coordinator replicas did not start: {exc}") from exc
        coordinators = RayCoordinators(
            ray, handles, [u for u, _ in answers], [p for _, p in answers]
        )
        self._started.append(coordinators)
        return coordinators

    def start_worker(self, argv: list[str], log: Path, env: Mapping[str, str]) -> RayWorker:
        """A worker actor running `tetherfed <argv>`; restarted by Ray up to MAX_RESTARTS
        times, each time resuming from its checkpoint."""
        ray = self._ray
        name = argv[argv.index("--name") + 1] if "--name" in argv else "worker"
        handle = (
            ray.remote(WorkerActor)
            .options(
                num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker,
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_RESTARTS,
                max_concurrency=2,
                name=self._label(name),
            )
            .remote(argv, str(log), dict(env))
        )
        need = {"CPU": self.cpus_per_worker, "GPU": float(self.gpus_per_worker)}
        worker = RayWorker(ray, handle, name, log, need, self.pending_timeout_s)
        self._started.append(worker)
        return worker

    def stop(self, procs: Iterable[Any]) -> None:
        """Kill the actors behind `procs` (workers, or the coordinator replicas and then their
        placement group)."""
        for proc in procs:
            if isinstance(proc, RayWorker | RayCoordinators):
                proc.kill()
            if isinstance(proc, RayCoordinators):
                self._remove_groups()

    def _remove_groups(self) -> None:
        from ray.util import remove_placement_group  # noqa: PLC0415 (optional extra)

        while self._groups:
            with contextlib.suppress(Exception):
                remove_placement_group(self._groups.pop())

    def close(self) -> None:
        """Kill whatever is still running, remove the placement groups, leave the cluster
        (which stays up)."""
        if self._ray is None:
            return
        for proc in self._started:
            proc.kill()
        self._remove_groups()
        self._ray.shutdown()
        self._ray = None


# -- command line --------------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--engine and the Ray engine's options (for `up` and `experiment run`)."""
    group = parser.add_argument_group("engine (where processes run)")
    group.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: processes on this machine; ray: actors on a Ray cluster",
    )
    group.add_argument(
        "--address", default="auto", help="ray: the cluster (auto, or HOST:PORT of the head's GCS)"
    )
    group.add_argument(
        "--redis-url", default=None, help="Redis the coordinator uses (required with --engine ray)"
    )
    group.add_argument(
        "--coordinators", type=int, default=1, help="ray: coordinator replicas, spread over nodes"
    )
    group.add_argument("--gpus-per-worker", type=int, default=0, help="ray: whole GPUs per worker")
    group.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="ray: logical CPUs per worker actor"
    )
    group.add_argument(
        "--pending-timeout",
        type=float,
        default=PENDING_TIMEOUT_S,
        metavar="S",
        help="ray: fail the run when a worker actor waits this long for resources (shown "
        "pending meanwhile); raise it for an autoscaling cluster",
    )


def engine_from_args(args: argparse.Namespace, workers: int | None = None) -> Any:
    """The engine of parsed `add_engine_args` options, connected (EngineRefused, EngineFailed);
    `workers`, when the run's count is known, is checked against the Ray cluster's resources.
    The caller closes a Ray engine with `close_engine`."""
    if args.engine == "local":
        return LocalEngine(redis_url=args.redis_url)
    engine = RayEngine(
        address=args.address,
        redis_url=args.redis_url,
        coordinators=args.coordinators,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        workers=workers,
        pending_timeout_s=args.pending_timeout,
    )
    engine.connect()
    return engine


def close_engine(engine: Any) -> None:
    """Close an engine that has a `close` (Ray); nothing for the local one."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
