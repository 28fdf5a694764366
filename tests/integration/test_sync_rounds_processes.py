"""Synchronous rounds (`Policy.sync_every`) with real `tetherfed worker` processes against a real
coordinator: every round's decisions are applied at the round's step, before the next step, and a
missing peer costs a round `sync_timeout_s` (named in the worker's log), never the run."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from events import MANY_STEPS, applied, finish_workers, json_lines, started, wait_for

from tether_protocol.messages import Heartbeat, LayerSpec
from tetherfed import Client

pytestmark = pytest.mark.integration

EVERY = 5
# The FedAvg round (McMahan et al. 2017): every EVERY steps each worker averages with the peers'
# step-k tethers. max_staleness_steps 0: only a partner's snapshot of the very same step counts,
# at scoring (policy) and when applying (the worker refuses a partner snapshot of another step).
FEDAVG = {
    "fedavg_every": EVERY,
    "sync_every": EVERY,
    "sync_timeout_s": 120.0,
    "max_staleness_steps": 0,
}
# Publishes at round steps only (a step budget no test reaches), few log lines (nobody reads
# the pipes meanwhile).
QUIET = ["--steps", MANY_STEPS, "--publish-every", MANY_STEPS]
QUIET += ["--log-every", MANY_STEPS, "--eval-every", MANY_STEPS]


def worker(url: str, fed: str, seed: int, out: Path, *extra: str) -> subprocess.Popen[str]:
    """`tetherfed worker` on the CPU; its stderr (the log) goes to <out>.log."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tetherfed.cli", "worker", "--coordinator", url]
    cmd += ["--federation", fed, "--seed", str(seed), "--name", f"w{seed}", "--device", "cpu"]
    cmd += ["--checkpoint-dir", str(out), "--threads", "1", *QUIET, *extra]
    with (out.parent / f"{out.name}.log").open("w") as log:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)


def done(proc: subprocess.Popen[str], out: Path, timeout: float = 300) -> dict[str, Any]:
    """Wait for a finished worker; its `done` metrics line."""
    assert proc.wait(timeout=timeout) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    summary = json_lines(out / "metrics.jsonl")[-1]
    assert summary["event"] == "done", summary
    return summary


@pytest.fixture
def coordinator(coordinator_process: Callable[..., Any]) -> Any:
    return coordinator_process()


@pytest.mark.timeout(600)  # the wait below is bounded by EVENT_TIMEOUT_S, generous for load
def test_each_fedavg_round_is_applied_at_its_step_against_the_peers_same_step(
    coordinator: Any, tmp_path: Path
) -> None:
    with Client(coordinator.url) as api:
        api.create_federation("sync", policy=FEDAVG)  # type: ignore[arg-type]
    dirs = [tmp_path / f"w{s}" for s in (1, 2)]
    procs = [
        worker(coordinator.url, "sync", s, d, "--wait-peers", "2")
        for s, d in zip((1, 2), dirs, strict=True)
    ]
    wait_for(
        "three rounds of merges applied by each of two workers",
        lambda: (
            all(started(d) for d in dirs)
            and all(len({e["step"] for e in applied(d)}) >= 3 for d in dirs)
        ),
        procs=procs,
    )
    finish_workers(p.pid for p in procs)
    summaries = [done(p, d) for p, d in zip(procs, dirs, strict=True)]
    for d, summary in zip(dirs, summaries, strict=True):
        merges = applied(d)
        # Applied at the step of the snapshot its round scored, before the next step trained.
        assert all(e["step"] == e["round_step"] and e["step"] % EVERY == 0 for e in merges), merges
        rejected = [
            e
            for e in json_lines(d / "metrics.jsonl")
            if e.get("event") == "decision" and e.get("outcome") == "rejected"
        ]
        assert not rejected, f"decisions refused (a stale partner snapshot?): {rejected}"
        assert summary["rounds"] >= 3 and summary["merge"] == len(merges), summary
    with Client(coordinator.url) as api:
        decisions = api.decisions("sync", action="merge", limit=1000).data
    assert decisions and all(
        d.partner_snapshot is not None and d.partner_snapshot.step == d.own_snapshot.step
        for d in decisions
    ), "a round compared a peer's snapshot of another step"


@pytest.fixture
def ghost(coordinator: Any) -> Iterator[str]:
    """A worker registered in federation "ghost" that heartbeats (active) but never publishes."""
    layers = [LayerSpec(name="never", shape=[2, 2], dtype="float32")]
    with Client(coordinator.url) as api:
        api.create_federation("ghost", policy={**FEDAVG, "sync_timeout_s": 1.5})  # type: ignore[arg-type]
        reg = api.register_worker("ghost", "ghost", layers)
    stop = threading.Event()

    def beat() -> None:
        with Client(coordinator.url, token=reg.token) as own:
            while not stop.wait(1.0):
                own.heartbeat("ghost", reg.worker_id, Heartbeat(step=0, epoch=0))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    yield reg.worker_id
    stop.set()
    thread.join(timeout=10)


@pytest.mark.timeout(600)
def test_a_missing_peer_times_a_round_out_by_name_and_training_goes_on(
    coordinator: Any, ghost: str, tmp_path: Path
) -> None:
    out = tmp_path / "w1"
    proc = worker(coordinator.url, "ghost", 1, out)
    log = tmp_path / "w1.log"

    def timed_out_twice() -> bool:
        text = log.read_text()
        return text.count("not decided within sync_timeout_s") >= 2 and ghost in text

    wait_for("two rounds timed out, naming the silent peer", timed_out_twice, procs=[proc])
    wait_for("the worker started", lambda: started(out), procs=[proc])
    finish_workers([proc.pid])
    summary = done(proc, out)
    assert summary["steps"] >= 2 * EVERY, "training went on past the timed-out rounds"
    assert summary["rounds_timed_out"] >= 2, summary
    line = next(x for x in log.read_text().splitlines() if "not decided within" in x)
    assert f"ghost ({ghost})" in line and "below step" in line, line
