"""The worker process: train a built-in (or user) task with a tethered model, federating as it goes.

Flat on purpose: build everything from a typed config, then one loop. Metrics go to stdout and to
`metrics.jsonl` as one JSON object per line; checkpoints `latest.pt` and `best.pt` (by validation
loss) hold the config, step, model, optimizer, scheduler, tethers, generations and the applied
decision ids, so `--resume` continues under the same worker id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from tetherfed.client._errors import TetherError
from tetherfed.client._retry import RetryPolicy
from tetherfed.client._sdk import Client
from tetherfed.diagnostics._recorder import Diagnostics, parse_spec
from tetherfed.federation._federation import Federation, StepReport
from tetherfed.tethers import Task
from tetherfed.tethers._probe import Probe
from tetherfed.tethers._tethering import (
    tether,
    tether_coverage,
    tethered_layers,
    update_importance,
)

from . import _checkpoint as checkpoint
from ._options import WorkerInfo, WorkerOptions
from ._tasks import build_model, default_model, load_task, shard

log = logging.getLogger("tetherfed.worker")
PEER_TIMEOUT_S = 120.0


class WorkerConfig(WorkerOptions):
    """Everything a worker run needs (its training options plus where it connects, its seeds,
    device and checkpoints); stored in its checkpoints.

    Seeds: `init_seed` draws the model and tether init, `data_seed` the dataset and its order;
    each defaults to `seed`. Workers with one init seed and different data seeds start from the
    same model and tethers (what weight merges need) but see the data in different orders. A
    sharded worker's dataset is drawn from `run_seed` instead (one dataset for its group, see
    `tetherfed.worker._tasks.shard`); its order still comes from `data_seed`.

    `worker_index`, `group_index`, `index_in_group`, `group_size`, `repeat` and `run_seed` place
    the worker in its run (the launcher sets them from the plan): the task function's
    `WorkerInfo` (`info`).
    """

    model_config = ConfigDict(extra="forbid")

    coordinator: str | None = Field(default=None, description="Coordinator URL; None trains alone.")
    federation: str = "default"
    token: str | None = None
    name: str | None = None
    seed: int = 0
    init_seed: int | None = Field(default=None, description="Model and tether init (default seed).")
    data_seed: int | None = Field(default=None, description="Data and its order (default seed).")
    device: str = "auto"
    checkpoint_dir: Path | None = None
    resume: bool = False
    group: str | None = Field(default=None, description="Experiment group (sent as worker meta).")
    probe_size: int = Field(default=64, ge=1, description="Validation samples for the Jacobian.")
    wait_peers: int = Field(
        default=0, ge=0, description="Before training, wait until this many workers are active."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads (torch.set_num_threads); None: torch's default, every "
        "core (or OMP_NUM_THREADS). Launchers set cores / workers so workers do not oversubscribe.",
    )
    worker_index: int = Field(default=0, ge=0, description="The worker's index in its run.")
    group_index: int = Field(default=0, ge=0, description="Its group's index among the run's.")
    index_in_group: int = Field(default=0, ge=0, description="Its index within its group.")
    group_size: int = Field(default=1, ge=1, description="Workers in its group.")
    repeat: int = Field(default=0, ge=0, description="Experiment repeat.")
    run_seed: int | None = Field(default=None, description="The run's seed (default seed).")

    @model_validator(mode="after")
    def _in_group(self) -> WorkerConfig:
        if self.index_in_group >= self.group_size:
            raise ValueError(
                f"index_in_group {self.index_in_group} outside a group of {self.group_size}"
            )
        return self

    @property
    def info(self) -> WorkerInfo:
        """Where the worker stands in its run, as its task function sees it."""
        return WorkerInfo(
            index=self.worker_index,
            group=self.group or "default",
            group_index=self.group_index,
            index_in_group=self.index_in_group,
            group_size=self.group_size,
            repeat=self.repeat,
            seed=self.seed if self.run_seed is None else self.run_seed,
        )

    @property
    def resolved_init_seed(self) -> int:
        """The init seed in effect."""
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def resolved_data_seed(self) -> int:
        """The data seed in effect."""
        return self.seed if self.data_seed is None else self.data_seed

    def total_steps(self, steps_per_epoch: int) -> int:
        """Steps to run: `steps`, else `epochs` × steps per epoch (default one epoch)."""
        return self.steps if self.steps is not None else (self.epochs or 1) * steps_per_epoch


def pick_device(spec: str) -> torch.device:
    """`auto` → the first CUDA device if there is one, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def freeze_for(model: nn.Module, train: str) -> None:
    """Freeze what `train` leaves out: `tethers` freezes every parameter but the tether logits,
    `weights` freezes the tether logits, `both` freezes nothing."""
    tethers = {id(tp.storage()) for tp in tethered_layers(model).values()}
    for param in model.parameters():
        is_tether = id(param) in tethers
        param.requires_grad_(train == "both" or (train == "tethers") == is_tether)


def build_optimizer(model: nn.Module, cfg: WorkerConfig) -> torch.optim.Optimizer:
    """Optimizer with one parameter group per `layer_lr` prefix (first match wins) plus the rest,
    over the parameters `cfg.train` leaves trainable (see `freeze_for`)."""
    freeze_for(model, cfg.train)
    groups: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in cfg.layer_lr}
    rest: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in cfg.layer_lr if name.startswith(p)), None)
        (groups[prefix] if prefix is not None else rest).append(param)
    param_groups = [{"params": rest}] + [
        {"params": params, "lr": cfg.lr * cfg.layer_lr[prefix]}
        for prefix, params in groups.items()
        if params
    ]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    optimizer: torch.optim.Optimizer = kinds[cfg.optimizer](
        param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: WorkerConfig, total: int) -> Any:
    """LR schedule over the run: constant, cosine to zero, or ×0.1 at 1/2 and 3/4 of the run."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    if cfg.scheduler == "step":
        milestones = [total // 2, 3 * total // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def batches(task: Task, batch_size: int, seed: int) -> Iterator[tuple[int, Any, Any]]:
    """(epoch, x, y) forever, reshuffled every epoch from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=generator)
    epoch = 0
    while True:
        for x, y in loader:
            yield epoch, x, y
        epoch += 1


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, device: torch.device) -> float:
    """Mean validation loss."""
    return evaluate_metrics(model, task, device)["val_loss"]


@torch.no_grad()
def evaluate_metrics(model: nn.Module, task: Task, device: torch.device) -> dict[str, float]:
    """`val_loss` (mean validation loss) and `val_<name>` for each of the task's metrics, over
    the whole validation set in one forward pass."""
    model.eval()
    x, y = task.val.tensors[:2]
    out, target = model(x.to(device)), y.to(device)
    found = {"val_loss": float(task.loss_fn(out, target))}
    found |= {f"val_{name}": float(fn(out, target)) for name, fn in task.metrics.items()}
    model.train()
    return found


def save_checkpoint(path: Path, run: _Run, step: int) -> None:
    """Write the run's checkpoint at `step` (see `_checkpoint.save`: atomic, durable, mode 0600).

    The coordinator's token is never written (`config` leaves it out). The federation state holds
    this worker's own token, which lets a resumed run act as the same worker and nothing else.
    `CheckpointError` when it cannot be written."""
    state = {
        "config": run.cfg.model_dump(mode="json", exclude={"token"}),
        "step": step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "federation": run.fed.state_dict() if run.fed is not None else None,
        "val_loss": run.val_loss,
    }
    checkpoint.save(path, state)


class Metrics:
    """One JSON object per line to stdout and to a JSONL file."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        torn = path is not None and _torn(path)
        self._file = path.open("a") if path is not None else None
        if self._file is not None and torn:
            self._file.write("\n")  # a killed run's torn last line stays a line of its own

    def emit(self, **fields: Any) -> None:
        line = json.dumps(fields, separators=(",", ":"))
        print(line, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _torn(path: Path) -> bool:
    """Whether the file's last line lacks its newline (its writer was killed mid-line)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


@dataclass
class _Run:
    """Everything one worker run holds, built once by `_setup`."""

    cfg: WorkerConfig
    device: torch.device
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Iterator[tuple[int, Any, Any]]
    total: int
    start: int
    fed: Federation | None
    metrics: Metrics
    diag: Diagnostics | None = None
    probe: Probe | None = None  # the probe batches the federation uses (the gate's: probe.own)
    epoch: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: {"merge": 0, "drift": 0, "rejected": 0, "gate_rejected": 0}
    )
    best: float = math.inf
    val_loss: float = math.nan
    val_metrics: dict[str, float] = field(default_factory=dict)  # val_<name> of the task metrics
    started: float = field(default_factory=time.monotonic)
    warned_skip: bool = False  # the first publish the I/O budget skipped was logged


def _setup(cfg: WorkerConfig) -> _Run:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.resolved_data_seed)
    device = pick_device(cfg.device)
    info = cfg.info
    task_seed = info.seed if cfg.shard is not None else cfg.resolved_data_seed
    task = load_task(cfg.task, seed=task_seed, worker=info, args=cfg.task_args)
    held_out = None
    if cfg.shard is not None:
        task, held_out = shard(task, cfg.shard, info, cfg.resolved_data_seed)
    model = build_model(cfg.model or default_model(cfg.task), task, seed=cfg.resolved_init_seed)
    model = tether(model, cfg.tether_mode, seed=cfg.resolved_init_seed).to(device)
    data = batches(task, cfg.batch_size, cfg.resolved_data_seed)
    total = cfg.total_steps(math.ceil(len(task.train) / cfg.batch_size))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    resume_state, start = None, 0
    latest = cfg.checkpoint_dir / "latest.pt" if cfg.checkpoint_dir else None
    if cfg.resume and latest is not None and latest.exists():
        saved = checkpoint.load(latest, device)
        parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        checkpoint.restore(latest, saved, parts, cfg.model_dump(mode="json", exclude={"token"}))
        resume_state, start = saved["federation"], saved["step"]
        for _ in range(start):  # the same data order as an uninterrupted run
            next(data)
    # The merge gate's batch: a sharded worker's group reserve, else its own training examples.
    reserve = held_out if held_out is not None and len(held_out) else None
    probe = Probe(model, task, device, seed=cfg.resolved_data_seed, held_out=reserve)
    fed = None
    if cfg.coordinator:
        fed = Federation(
            cfg.coordinator,
            cfg.federation,
            model,
            name=cfg.name or f"{cfg.task}-s{cfg.resolved_data_seed}",
            publish_every=cfg.publish_every,
            io_budget=cfg.io_budget,
            wire_dtype=cfg.wire_dtype,
            token=cfg.token,
            meta=_meta(cfg, device),
            resume=resume_state,
            probe=probe,
            optimizer=optimizer,  # decisions land only between optimizer steps
        )
    metrics = Metrics(cfg.checkpoint_dir / "metrics.jsonl" if cfg.checkpoint_dir else None)
    run = _Run(cfg, device, task, model, optimizer, scheduler, data, total, start, fed, metrics)
    run.probe = probe
    run.diag = _diagnostics(run)
    return run


def _diagnostics(run: _Run) -> Diagnostics | None:
    """The weight diagnostics of `--diagnostics`, writing into the checkpoint folder and sending
    telemetry through the federation; the probe is the first validation samples."""
    cfg = run.cfg
    if cfg.diagnostics is None:
        return None
    return Diagnostics(
        run.model,
        **parse_spec(cfg.diagnostics),
        out_dir=cfg.checkpoint_dir,
        probe=run.task.val.tensors[0][: cfg.probe_size].to(run.device),
        seed=cfg.resolved_init_seed,
        steps_per_epoch=math.ceil(len(run.task.train) / cfg.batch_size),
        last_step=run.total,
        sink=run.fed.telemetry if run.fed is not None else None,
    )


def _meta(cfg: WorkerConfig, device: torch.device) -> dict[str, Any]:
    meta = {
        "task": cfg.task,
        "device": str(device),
        "init_seed": cfg.resolved_init_seed,
        "data_seed": cfg.resolved_data_seed,
    }
    return meta | ({"group": cfg.group} if cfg.group else {})


def _train_step(run: _Run) -> tuple[int, float, float]:
    epoch, x, y = next(run.data)
    out = run.model(x.to(run.device, non_blocking=True))
    loss = run.task.loss_fn(out, y.to(run.device, non_blocking=True))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    grad_norm = float(nn.utils.clip_grad_norm_(run.model.parameters(), math.inf))
    if run.cfg.tether_mode == "importance":
        update_importance(run.model)
    run.optimizer.step()
    run.scheduler.step()
    loss_value = loss.item()
    if run.fed is not None:
        report = run.fed.step(loss=loss_value, epoch=epoch, grad_norm=grad_norm)
        _count(run, report)
        _warn_skipped(run, report.step)
    return epoch, loss_value, grad_norm


def _pace(run: _Run) -> dict[str, Any]:
    """The federation's pace in this process: publishes sent, scheduled publishes the I/O
    budget skipped (a later snapshot went instead), merges applied per 100 steps; under
    synchronous rounds (`policy.sync_every`) also the rounds waited for, those that timed out
    and the seconds spent waiting."""
    stats = run.fed.stats if run.fed is not None else None
    if stats is None:
        return {"publishes": 0, "publishes_skipped": 0, "merges_per_100_steps": 0.0}
    rounds = {
        "rounds": stats.rounds,
        "rounds_timed_out": stats.rounds_timed_out,
        "round_wait_s": round(stats.round_wait_s, 3),
    }
    return {
        "publishes": stats.published,
        "publishes_skipped": stats.skipped,
        "merges_per_100_steps": round(stats.merges_per_100_steps, 3),
        **(rounds if stats.rounds else {}),
    }


def _warn_skipped(run: _Run, step: int) -> None:
    """Log, once a run, the first scheduled publish the I/O budget skipped."""
    if run.warned_skip or run.fed is None or not run.fed.stats.skipped:
        return
    run.warned_skip = True
    budget = run.cfg.io_budget
    why = (
        f"publishing may take at most {budget * 100:g}% of the wall time (--io-budget {budget:g})"
        if budget < 1
        else "the previous snapshot was still being sent (--io-budget 1: no pause already)"
    )
    log.warning(
        "a scheduled publish was skipped by step %d, a later snapshot goes instead: %s; a "
        "larger --io-budget (up to 1: publish on every scheduled step) publishes more often. "
        "metrics.jsonl counts publishes and publishes_skipped",
        step,
        why,
    )


def _count(run: _Run, report: StepReport) -> None:
    """Tally applied and rejected decisions, each one a `decision` metrics event (the worker's
    own record of what it applied, step by step, read back by `make chaos`; `round_step`: the
    step of the snapshot the decision was scored for, the step a synchronous round applies it
    at); every merge-gate check is a `gate` event."""
    for decision in report.applied:
        run.counts[decision.action] = run.counts.get(decision.action, 0) + 1
        run.metrics.emit(
            event="decision",
            step=report.step,
            round_step=decision.own_snapshot.step,
            decision_id=decision.id,
            action=decision.action,
            layer=decision.layer,
            outcome="applied",
        )
    run.counts["rejected"] += len(report.rejected)
    for decision, reason in report.rejected:
        run.metrics.emit(
            event="decision",
            step=report.step,
            decision_id=decision.id,
            action=decision.action,
            layer=decision.layer,
            outcome="rejected",
            reason=reason,
        )
    for check in report.gate:
        run.counts["gate_rejected"] += not check.kept
        run.metrics.emit(
            event="gate",
            step=report.step,
            decision_id=check.decision.id,
            layer=check.decision.layer,
            partner_id=check.decision.partner_id,
            loss_before=_round(check.loss_before),
            loss_after=_round(check.loss_after),
            rise=_round(check.rise),
            kept=check.kept,
        )


def _evaluate(run: _Run, step: int) -> None:
    found = evaluate_metrics(run.model, run.task, run.device)
    run.val_loss = found.pop("val_loss")
    run.val_metrics = found
    if run.cfg.checkpoint_dir is None:
        return
    save_checkpoint(run.cfg.checkpoint_dir / "latest.pt", run, step)
    # What a resume from latest.pt would start from: the step and the worker id it holds.
    worker_id = run.fed.worker_id if run.fed is not None else None
    run.metrics.emit(event="checkpoint", step=step, worker_id=worker_id)
    if run.val_loss < run.best:
        run.best = run.val_loss
        save_checkpoint(run.cfg.checkpoint_dir / "best.pt", run, step)


def _round(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def _log(run: _Run, step: int, epoch: int, loss: float, grad_norm: float) -> None:
    run.metrics.emit(
        event="step",
        worker_id=run.fed.worker_id if run.fed else None,
        step=step,
        total=run.total,
        epoch=epoch,
        loss=_round(loss),
        val_loss=_round(run.val_loss),
        **{name: _round(value) for name, value in run.val_metrics.items()},
        grad_norm=_round(grad_norm),
        generation=sum(run.fed.generations.values()) if run.fed else 0,
        merges=run.counts["merge"],
        drifts=run.counts["drift"],
        rejected=run.counts["rejected"],
        gate_rejected=run.counts["gate_rejected"],
        steps_per_s=round((step - run.start) / max(time.monotonic() - run.started, 1e-9), 2),
        **_pace(run),
    )


def wait_for_peers(cfg: WorkerConfig, fed: Federation, timeout_s: float = PEER_TIMEOUT_S) -> bool:
    """Block until `cfg.wait_peers` workers (this one included) are active in the federation, so
    the workers of a run train side by side even when they start seconds apart; False (and a
    warning) when they were not all there within `timeout_s`: training then starts anyway. A peer
    that already trained and left counts: on a loaded machine a short run's first workers may
    finish before the last one looks, and waiting for them would last the whole `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    fed.wait_registered(timeout_s)
    with Client(cfg.coordinator or "", token=cfg.token, retry=RetryPolicy(tries=1)) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(TetherError):
                workers = client.list_workers(cfg.federation).data
                if sum(w.status in ("active", "left") for w in workers) >= cfg.wait_peers:
                    return True
            time.sleep(0.2)
    log.warning(
        "fewer than %d workers active after %.0fs; training anyway", cfg.wait_peers, timeout_s
    )
    return False


@contextlib.contextmanager
def finish_on_sigusr1() -> Iterator[threading.Event]:
    """An event SIGUSR1 sets: the worker then ends at the next step boundary as if its step
    budget ended there (final evaluation, checkpoint and diagnostics, acks sent, federation left,
    exit 0), so a run can be ended once what one waits for has happened. Only the main thread
    may set handlers: elsewhere (a Ray actor) the event is never set."""
    finish = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield finish
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: finish.set())
    try:
        yield finish
    finally:
        signal.signal(signal.SIGUSR1, previous)


def run_worker(cfg: WorkerConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final summary (also emitted as the last metrics line).
    SIGUSR1 ends the training early, as a finished run (`finish_on_sigusr1`)."""
    with finish_on_sigusr1() as finish:
        return _run_worker(cfg, finish)


def _run_worker(cfg: WorkerConfig, finish: threading.Event) -> dict[str, Any]:
    run = _setup(cfg)
    run.metrics.emit(
        event="start",
        step=run.start,
        resumed=run.start > 0,
        worker_id=run.fed.worker_id if run.fed is not None else None,
        threads=torch.get_num_threads(),
        coverage=tether_coverage(run.model).as_dict(),
    )
    if run.fed is not None and cfg.wait_peers and run.start == 0:
        wait_for_peers(cfg, run.fed)
    last, failure = run.start, None  # the last step trained; why the run ended early
    try:
        for step in range(run.start + 1, run.total + 1):
            epoch, loss, grad_norm = _train_step(run)
            run.epoch, last = epoch, step
            ending = step == run.total or finish.is_set()
            if run.diag is not None:
                run.diag.step(step, epoch, loss)
            if step % cfg.eval_every == 0 or ending:
                _evaluate(run, step)
            if step % cfg.log_every == 0 or ending:
                _log(run, step, epoch, loss, grad_norm)
            if ending:
                break
        if run.diag is not None:
            run.diag.close(last, run.epoch)  # final values, before telemetry is flushed
    except BaseException as error:
        failure = error
        raise
    finally:
        if run.fed is not None:
            run.fed.close()
            _warn_skipped(run, last)
        worker_id = run.fed.worker_id if run.fed else None
        summary = {
            "event": "done" if failure is None else _ended_by(failure),
            "worker_id": worker_id,
            "steps": last,
            **({} if failure is None else {"error": f"{type(failure).__name__}: {failure}"}),
            "val_loss": _round(run.val_loss),
            **{name: _round(value) for name, value in run.val_metrics.items()},
            **run.counts,
            **_pace(run),
            "holds": run.fed.holds if run.fed is not None else {},  # rounds held, by code
        }
        run.metrics.emit(**summary)
        run.metrics.close()
    return summary


def _ended_by(failure: BaseException) -> str:
    """The last metrics event of a run that did not finish: interrupted, or failed."""
    return "interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"


def main_worker(cfg: WorkerConfig) -> int:
    """CLI entry: run and map failures to exit codes."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # httpx logs every request at INFO: thousands of lines per run that hide the worker's own
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_worker(cfg)
    return 0
