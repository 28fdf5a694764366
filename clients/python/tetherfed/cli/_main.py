"""The `tetherfed` command: thin — it parses, then calls the library.

Exit codes (one table, used by every subcommand):
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tetherfed._exits import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from tetherfed.worker._main import TOKEN_ENV

__doc__ += "\n".join(f"    {code:>3}  {name}" for name, code in EXIT_CODES)


def _cmd_worker(args: argparse.Namespace) -> int:
    from tetherfed.worker import run_from_args

    return run_from_args(args)


def _cmd_coordinator(args: argparse.Namespace, rest: list[str]) -> int:
    from tetherfed_coordinator.__main__ import main as coordinator_main

    return coordinator_main(rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from tetherfed_bench.run import main as bench_main  # the wheel ships bench/ under this name
    except ImportError as error:
        raise CliError("the benchmarks are not installed (tetherfed_bench)") from error
    return bench_main(args.names, quick=args.quick, json_path=args.json)


def _cmd_federation(args: argparse.Namespace) -> int:
    from tetherfed.client import Client
    from tetherfed.launch._launch import create_federation, resolve_policy

    try:
        policy = resolve_policy(args.policy)
    except (KeyError, ValueError, OSError) as error:
        raise CliError(f"invalid --policy {args.policy!r}: {error}") from error
    with Client(args.coordinator, token=args.token or os.environ.get(TOKEN_ENV) or None) as client:
        create_federation(client, args.name, policy)
        print(client.get_federation(args.name).model_dump_json(indent=2))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        from tetherfed.report import write_report

        path = write_report(args.folder, out=args.out, png_dir=args.png)
    except ImportError as error:  # plotly missing: the `report` extra
        raise CliError(
            f"needs the report extra (pip install 'tetherfed[report]'): {error}"
        ) from error
    print(path)
    return EXIT_OK


def _cmd_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tetherfed import experiment
    from tetherfed.launch._ray import close_engine, engine_from_args

    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.action == "schema":
        print(json.dumps(experiment.Spec.model_json_schema(), indent=2))
    elif args.action == "list":
        for name, path in sorted(experiment.examples().items()):
            print(f"{name:<20} {path}")
    elif args.action == "status":
        rows, summary = experiment.status(args.dir)
        console.print(experiment.summary_table(rows, summary))
    elif args.dry_run:
        _spec, runs, _text = experiment.plan(args.spec, args.set)
        experiment.print_dry_run(runs, console)
    else:
        engine = engine_from_args(args)
        try:
            rows = experiment.run(
                args.spec,
                out=args.out,
                resume=args.resume,
                force=args.force,
                coordinator=args.coordinator,
                token=args.token,
                overrides=args.set,
                jobs=args.jobs,
                console=console,
                engine=engine,
            )
        finally:
            close_engine(engine)
        reference = experiment.reference_arm(args.spec, args.set)
        console.print(experiment.summary_table(rows, experiment.summarize(rows, reference)))
        return EXIT_FAILED if any(r["state"] != "finished" for r in rows) else EXIT_OK
    return EXIT_OK


def _add_experiment_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tetherfed.launch._ray import add_engine_args

    exp = sub.add_parser("experiment", help="run a spec: sweeps, arms, repeats, results folder")
    actions = exp.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run (or --resume) an experiment spec")
    run.add_argument("spec", help="a TOML spec file, or a built-in example name (see `list`)")
    run.add_argument("--out", type=Path, default=None, help="results folder (default: the spec's)")
    run.add_argument("--resume", action="store_true", help="skip finished runs, continue the rest")
    run.add_argument("--force", action="store_true", help="accept a folder of another spec")
    run.add_argument("--dry-run", action="store_true", help="print the runs and their count")
    run.add_argument("--coordinator", default=None, help="coordinator URL (none: start our own)")
    run.add_argument("--token", default=None, help="bearer token of that coordinator")
    run.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: spec's)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. --set experiment.steps=50",
    )
    add_engine_args(run)
    actions.add_parser("schema", help="print the spec's JSON Schema")
    actions.add_parser("list", help="list the built-in example specs")
    status = actions.add_parser("status", help="the summary table of an experiment folder")
    status.add_argument("dir", type=Path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="tetherfed", description="Multi-agent tether federation.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "coordinator",
        help="run the coordinator (options: --host --port --redis-url --data-dir)",
        add_help=False,
    )

    from tetherfed.worker._main import add_worker_parser_args

    add_worker_parser_args(sub.add_parser("worker", help="train one federated worker"))

    federation = sub.add_parser("federation", help="create a federation (idempotent)")
    fed_sub = federation.add_subparsers(dest="action", required=True)
    create = fed_sub.add_parser("create", help="create NAME, or keep it if it exists")
    create.add_argument("name")
    create.add_argument(
        "--policy",
        default="default",
        help="preset (default, seed, cka, clustered, demo) or JSON file",
    )
    create.add_argument("--coordinator", default="http://127.0.0.1:8420")
    create.add_argument("--token", default=None, help=f"admin token (default: ${TOKEN_ENV})")

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

    _add_experiment_parser(sub)
    try:
        from ._up import add_up_parsers
    except ImportError:  # pragma: no cover - the launcher is optional in minimal installs
        pass
    else:
        add_up_parsers(sub)
    from tetherfed.launch._slurm import add_submit_parser

    add_submit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tetherfed` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "coordinator":
        return _cmd_coordinator(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    handlers = {
        "worker": _cmd_worker,
        "bench": _cmd_bench,
        "federation": _cmd_federation,
        "report": _cmd_report,
        "experiment": _cmd_experiment,
    }
    handler = handlers.get(args.command) or args.handler
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        code, message = _exit_for(error)
        if code is None:
            raise
        print(f"tetherfed {args.command}: {message}", file=sys.stderr)
        return code


def _exit_for(error: Exception) -> tuple[int | None, str]:
    """The exit code of an error a command ended with, and the line to print: the first row of
    the table that matches (None: not an expected error, let it raise)."""
    from tetherfed import experiment
    from tetherfed.client import RefusedError, TetherError, TransportError
    from tetherfed.launch._launch import CoordinatorUnreachable
    from tetherfed.launch._ray import EngineFailed, EngineRefused
    from tetherfed.report._data import ReportError

    if isinstance(error, CliError):
        return error.code, str(error)
    if isinstance(error, TransportError | CoordinatorUnreachable):
        return EXIT_UNREACHABLE, f"coordinator unreachable: {error}"
    table: list[tuple[tuple[type[Exception], ...], int]] = [
        (
            (experiment.SpecError, experiment.ExperimentError, EngineRefused, ReportError),
            EXIT_USAGE,
        ),
        ((RefusedError,), EXIT_REFUSED),
        ((EngineFailed, TetherError), EXIT_FAILED),
    ]
    for kinds, code in table:
        if isinstance(error, kinds):
            return code, str(error)
    return None, str(error)


if __name__ == "__main__":
    sys.exit(main())
