"""The `tetherfed` command: thin — it parses, then calls the library.

Exit codes (one table, used by every subcommand):
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed (a worker crashed, a benchmark errored)
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_UNREACHABLE = 3  # the coordinator could not be reached
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (128 + SIGINT)

__doc__ += "\n".join(
    f"    {code:>3}  {name}"
    for name, code in [
        ("ok", EXIT_OK),
        ("failed", EXIT_FAILED),
        ("usage", EXIT_USAGE),
        ("coordinator unreachable", EXIT_UNREACHABLE),
        ("interrupted", EXIT_INTERRUPTED),
    ]
)


def _layer_lr(values: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in values:
        prefix, _, factor = item.partition("=")
        try:
            out[prefix] = float(factor)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--layer-lr expects PREFIX=FACTOR, got {item!r}"
            ) from None
    return out


def _diagnostics_spec(value: str) -> str:
    from ._diagnostics import parse_spec

    try:
        parse_spec(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """Options of `tetherfed worker` (shared with `tetherfed up`, which passes them on)."""
    p.add_argument(
        "--task", default="random-classification", help="built-in task or module:function"
    )
    p.add_argument(
        "--model", default=None, help="built-in model or module:function (default: the task's)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to run")
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs to run (when --steps is not given)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--scheduler", choices=["none", "cosine", "step"], default="none")
    p.add_argument(
        "--layer-lr",
        action="append",
        default=[],
        metavar="PREFIX=FACTOR",
        help="per-layer LR multiplier",
    )
    p.add_argument("--publish-every", type=int, default=10, help="publish tethers every K steps")
    p.add_argument("--tether-mode", choices=["static", "learned", "importance"], default="static")
    p.add_argument(
        "--train", choices=["tethers", "weights", "both"], default="both",
        help="tethers: only tethers learn, over frozen weights (needs --tether-mode learned)",
    )  # fmt: skip
    p.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument(
        "--diagnostics",
        type=_diagnostics_spec,
        default=None,
        metavar="every=epoch|N[,budget=F]",
        help="weight diagnostics into the worker folder and to the coordinator (DESIGN §8)",
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    from ._worker import WorkerConfig, main_worker

    cfg = WorkerConfig(
        coordinator=args.coordinator,
        federation=args.federation,
        token=args.token,
        name=args.name,
        task=args.task,
        model=args.model,
        seed=args.seed,
        device=args.device,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        scheduler=args.scheduler,
        layer_lr=_layer_lr(args.layer_lr),
        publish_every=args.publish_every,
        tether_mode=args.tether_mode,
        train=args.train,
        wire_dtype=args.wire_dtype,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        log_every=args.log_every,
        eval_every=args.eval_every,
        diagnostics=args.diagnostics,
    )
    return main_worker(cfg)


def _cmd_coordinator(args: argparse.Namespace, rest: list[str]) -> int:
    from tetherfed_coordinator.__main__ import main as coordinator_main

    return coordinator_main(rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[3]
    if not (root / "bench" / "run.py").exists():
        print("tetherfed bench runs from a source checkout (bench/ was not found)", file=sys.stderr)
        return EXIT_USAGE
    sys.path.insert(0, str(root))
    from bench.run import main as bench_main

    return bench_main(args.names, quick=args.quick, json_path=args.json)


def _cmd_federation(args: argparse.Namespace) -> int:
    from ._errors import TetherError, TransportError
    from ._sdk import Client
    from ._up import create_federation, resolve_policy

    try:
        policy = resolve_policy(args.policy)
    except (KeyError, ValueError, OSError) as error:
        print(f"invalid --policy {args.policy!r}: {error}", file=sys.stderr)
        return EXIT_USAGE
    with Client(args.coordinator, token=args.token) as client:
        try:
            create_federation(client, args.name, policy)
            print(client.get_federation(args.name).model_dump_json(indent=2))
        except TransportError as error:
            print(f"coordinator unreachable: {error}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except TetherError as error:
            print(str(error), file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        from .report import ReportError, write_report
    except ImportError as error:  # plotly missing: the `report` extra
        print(f"tetherfed report needs the report extra (pip install 'tetherfed[report]'): {error}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        path = write_report(args.folder, out=args.out, png_dir=args.png)
    except ReportError as error:
        print(f"tetherfed report: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tetherfed", description="Multi-agent tether federation.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "coordinator",
        help="run the coordinator (options: --host --port --redis-url --data-dir)",
        add_help=False,
    )

    worker = sub.add_parser("worker", help="train one federated worker")
    worker.add_argument("--coordinator", default=None, help="coordinator URL (none: train alone)")
    worker.add_argument("--federation", default="default")
    worker.add_argument("--token", default=None, help="bearer token when the coordinator has one")
    worker.add_argument("--name", default=None)
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    worker.add_argument("--checkpoint-dir", type=Path, default=None)
    worker.add_argument(
        "--resume", action="store_true", help="continue from checkpoint-dir/latest.pt"
    )
    add_worker_args(worker)

    federation = sub.add_parser("federation", help="create a federation (idempotent)")
    fed_sub = federation.add_subparsers(dest="action", required=True)
    create = fed_sub.add_parser("create", help="create NAME, or keep it if it exists")
    create.add_argument("name")
    create.add_argument(
        "--policy", default="default", help="preset (default, seed, demo) or JSON file"
    )
    create.add_argument("--coordinator", default="http://127.0.0.1:8420")
    create.add_argument("--token", default=None)

    bench = sub.add_parser("bench", help="run benchmarks (ours vs a reference, same run)")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="small sizes; checks they run")
    bench.add_argument("--json", type=Path, default=None, help="append JSON lines here")

    report = sub.add_parser("report", help="write DIR/report.html for a run or experiment folder")
    report.add_argument(
        "folder", type=Path, help="a run folder (tetherfed up --out) or an experiment folder"
    )
    report.add_argument(
        "--out", type=Path, default=None, help="where to write (default DIR/report.html)"
    )
    report.add_argument(
        "--png", type=Path, default=None, metavar="DIR", help="also a PNG per figure (matplotlib)"
    )

    try:
        from ._up import add_up_parsers
    except ImportError:  # pragma: no cover - the launcher is optional in minimal installs
        pass
    else:
        add_up_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tetherfed` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "coordinator":
        return _cmd_coordinator(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    handlers = {"worker": _cmd_worker, "bench": _cmd_bench, "federation": _cmd_federation,
                "report": _cmd_report}  # fmt: skip
    handler = handlers.get(args.command) or args.handler
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
