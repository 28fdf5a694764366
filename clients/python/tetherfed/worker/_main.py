"""`tetherfed worker`: the worker's own command line, and its entry for the engines.

The Ray and Slurm engines start a worker by calling :func:`main` with the argv a local launcher
would pass to `tetherfed worker`, so every engine runs the same code path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tetherfed._exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_REFUSED
from tetherfed.client import RefusedError

from ._options import add_worker_args, options_from_args

if TYPE_CHECKING:
    from ._worker import WorkerConfig

TOKEN_ENV = "TETHER_TOKEN"  # the coordinator's token, as the coordinator itself reads it


def add_worker_parser_args(worker: argparse.ArgumentParser) -> None:
    """Add every `tetherfed worker` option to `worker`."""
    worker.add_argument("--coordinator", default=None, help="coordinator URL (none: train alone)")
    worker.add_argument("--federation", default="default")
    worker.add_argument(
        "--token",
        default=None,
        help=f"bearer token when the coordinator has one (default: ${TOKEN_ENV}; prefer the "
        "variable: a command line is visible to every user of the machine)",
    )
    worker.add_argument("--name", default=None)
    worker.add_argument("--seed", type=int, default=0, help="sets both seeds below")
    worker.add_argument("--init-seed", type=int, default=None, help="model + tether init seed")
    worker.add_argument("--data-seed", type=int, default=None, help="data and its order seed")
    worker.add_argument("--group", default=None, help="experiment group (worker meta)")
    worker.add_argument(
        "--wait-peers",
        type=int,
        default=0,
        metavar="N",
        help="before training, wait until N workers are active (max 120 s)",
    )
    worker.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's, every core; `up` and "
        "experiments give each worker cores / workers)",
    )
    place = worker.add_argument_group(
        "place in the run", "what a task function's `worker` (WorkerInfo) holds; set by launchers"
    )
    place.add_argument("--worker-index", type=int, default=0, help="index in the run")
    place.add_argument("--group-index", type=int, default=0, help="the group's index in the run")
    place.add_argument("--index-in-group", type=int, default=0, help="index within the group")
    place.add_argument("--group-size", type=int, default=1, help="workers in the group")
    place.add_argument("--repeat", type=int, default=0, help="experiment repeat")
    place.add_argument("--run-seed", type=int, default=None, help="the run's seed (default --seed)")
    worker.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    worker.add_argument("--checkpoint-dir", type=Path, default=None)
    worker.add_argument(
        "--resume", action="store_true", help="continue from checkpoint-dir/latest.pt"
    )
    add_worker_args(worker)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """The :class:`WorkerConfig` of parsed `tetherfed worker` arguments."""
    from ._worker import WorkerConfig  # noqa: PLC0415 (torch: not for `--help`)

    return WorkerConfig(
        **options_from_args(args).model_dump(),
        coordinator=args.coordinator,
        federation=args.federation,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        name=args.name,
        seed=args.seed,
        init_seed=args.init_seed,
        data_seed=args.data_seed,
        group=args.group,
        wait_peers=args.wait_peers,
        threads=args.threads,
        worker_index=args.worker_index,
        group_index=args.group_index,
        index_in_group=args.index_in_group,
        group_size=args.group_size,
        repeat=args.repeat,
        run_seed=args.run_seed,
        device=args.device,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Train one worker from parsed arguments; its exit code (refusals fail fast with the reason)."""
    from ._checkpoint import CheckpointError  # noqa: PLC0415 (torch: not for `--help`)
    from ._worker import main_worker  # noqa: PLC0415

    try:
        return main_worker(config_from_args(args))
    except RefusedError as error:  # permanent: fail fast, say why
        print(f"tetherfed worker: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except CheckpointError as error:  # the disk, not the code: one line that names the file
        print(f"tetherfed worker: {error}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tetherfed worker` (argv without the subcommand); its exit code."""
    parser = argparse.ArgumentParser(
        prog="tetherfed worker", description="Train one federated worker."
    )
    add_worker_parser_args(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
