"""Exit codes of every `tetherfed` command: one table, read by the CLI and the launchers."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed (a worker crashed, a benchmark errored)
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_UNREACHABLE = 3  # the coordinator could not be reached
EXIT_REFUSED = 4  # the coordinator refused for good: unknown federation, bad token, bad layers
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (128 + SIGINT)

EXIT_CODES: list[tuple[str, int]] = [
    ("ok", EXIT_OK),
    ("failed", EXIT_FAILED),
    ("usage", EXIT_USAGE),
    ("coordinator unreachable", EXIT_UNREACHABLE),
    ("refused by the coordinator", EXIT_REFUSED),
    ("interrupted", EXIT_INTERRUPTED),
]


class CliError(Exception):
    """A command cannot go on: `message` goes to stderr, prefixed with the command, and the
    process exits with `code` (one of the codes above)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
