"""Every shell command in the docs runs here, or is marked as one a test cannot run.

**The convention (for whoever writes a page).** Every command in a ```bash block of README.md or
docs/**/*.md is one test case, named by its page and line (`docs/how-to/curl.md:7`), run for
real. A command a test cannot run ends with a comment that says why:

    tetherfed submit slurm --workers 8 ...   # needs: cluster
    docker compose --profile gpu up          # needs: docker, gpu; on a CUDA host

`# needs: cluster` (Ray, Slurm, Grid Engine), `gpu`, `docker` or `network` (several
comma-separated, prose may follow), or `# long: <why>` for a run of minutes (a full experiment, a
benchmark). The same comment alone on a block's first line (after a `#!` line) marks the whole
block. Other comments are prose. A marked `tetherfed` command is still parsed, and run with
`--dry-run` where it has one (`experiment run`: the spec and every `--set`; `submit slurm`); a
`make` target is checked, not run: it exists, and the `tetherfed` commands of its recipe (and of
its prerequisites') parse.

**How a block runs.** Like a reader's terminal: one bash per block, in a folder of its own (with
`examples/` linked, as in a checkout), its commands in order and its variables kept, each with a
time limit; a case run alone runs the commands above it first. Substituted, and nothing else:

- `127.0.0.1:8420`, `localhost:8420` and `--port 8420` become a free port of the block; a
  `tetherfed coordinator` (a server) starts in the background on that port (`TETHER_PORT`, the
  setting it reads, where no `--port` is written), must answer /readyz, and stays up for the rest
  of the block; a second one replaces the first after Ctrl-C, as a reader switching. A command
  addressing that port when no coordinator of the block runs gets one, as the page's prose says.
- `redis://127.0.0.1:6379/0` becomes the tests' Redis (`redis_url`), under a key prefix of the
  block's (deleted afterwards).
- A folder a page takes as already made, by `make demo` or by a long run it marks, is made by a
  quick stand-in first (`GIVEN`).

A command passes when it exits 0 (a coordinator: when it answers /readyz)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tetherfed.cli import build_parser
from tetherfed_coordinator.__main__ import parse_args as coordinator_args
from tetherfed_coordinator.embedded import free_port
from tetherfed_coordinator.keys import glob_escape
from tetherfed_coordinator.topology import sync_client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NEEDS = {"cluster", "gpu", "docker", "network"}
COMMAND_TIMEOUT_S = 300.0  # one command; a 2-core machine shared with a benchmark is slow
READY_TIMEOUT_S = 90.0
DOC_PORT, DOC_REDIS = 8420, "redis://127.0.0.1:6379/0"
# A results folder in seconds: one run of the tiny example, four workers, ten steps.
TINY = (
    "tetherfed experiment run tiny --set experiment.repeats=1 --set experiment.steps=10 "
    "--set 'arms=[\"independent\"]' --out {}"
)
GIVEN = {
    "runs/demo": "tetherfed up --workers 2 --task sin --steps 40 --eval-every 20 --log-every 10 "
    "--diagnostics every=20 --out runs/demo",  # what `make demo` writes, smaller
    "runs/clustered-digits-rot": TINY.format("runs/clustered-digits-rot"),
}
# Pages being rewritten whose unmarked commands are skipped until they are marked; an entry must
# go once its page has no unmarked command (test_pages_waiting_for_marks_still_need_them).
WAITING_FOR_MARKS: dict[str, str] = {}

# Marked commands that have a --dry-run: it runs (it checks a spec and its --set overrides, or
# writes the sbatch scripts).
DRY_RUNS = [["experiment", "run"], ["submit", "slurm"]]
MARK = re.compile(r"(?:^|\s)#\s*(needs|long):\s*(.*?)\s*$")
LOOKS_LIKE_A_MARK = re.compile(r"(?:^|\s)#\s*(needs?|long|requires?)\s*:", re.I)
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Command:
    """One shell command of a ```bash block: its page, first line, text and mark."""

    page: str
    line: int
    block: int  # the line of the block's opening fence
    text: str  # as written: continuation lines and comments kept
    mark: str | None  # "needs: gpu", "long: 25 runs", or None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def argv(self) -> list[str]:
        """Its words, leading `VAR=value`s and `exec` dropped."""
        try:
            words = shlex.split(self.text.replace("\\\n", " "), comments=True)
        except ValueError:  # bash syntax shlex does not know; not a command we look into
            return []
        while words and (re.fullmatch(r"\w+=.*", words[0]) or words[0] == "exec"):
            words.pop(0)
        return words


def _complete(text: str) -> bool:
    """Whether `text` is whole shell commands (quotes closed, loops done): bash's own parser."""
    out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, check=False)
    return out.returncode == 0


def check_mark(kind: str, value: str) -> str | None:
    """What is wrong with a `# needs:` / `# long:` mark, or None."""
    if kind == "long":
        return None if value else "`# long:` says why (e.g. `# long: 25 runs`)"
    names = re.match(r"[a-z]+(?:\s*,\s*[a-z]+)*", value)
    unknown = set(re.split(r"\s*,\s*", names.group())) - NEEDS if names else {value}
    return (
        f"`# needs:` takes {', '.join(sorted(NEEDS))}, not {sorted(unknown)}" if unknown else None
    )


def _mark_of(line: str) -> str | None:
    found = MARK.search(line)
    return f"{found.group(1)}: {found.group(2)}" if found else None


def bash_blocks(page: Path) -> Iterator[tuple[int, str]]:
    """(line of the opening fence, body) of every ```bash block of `page`."""
    text = page.read_text()
    for found in FENCE.finditer(text):
        if found.group(1) == "bash":
            yield text.count("\n", 0, found.start()) + 1, found.group(2)


def commands_of(page: Path) -> list[Command]:
    """The commands of `page`'s bash blocks: continuation lines joined, comments skipped."""
    name = str(page.relative_to(ROOT))
    commands = []
    for fence, body in bash_blocks(page):
        lines = body.splitlines()
        first = 1 if lines and lines[0].startswith("#!") else 0
        block_mark = _mark_of(lines[first]) if len(lines) > first else None
        if block_mark and not lines[first].lstrip().startswith("#"):
            block_mark = None  # a command's own mark, not the block's
        pending: list[str] = []
        start = 0
        for i, line in enumerate(lines):
            if not pending:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                start = fence + 1 + i
            pending.append(line)
            text = "\n".join(pending)
            if line.endswith("\\") or not _complete(text):
                continue
            mark = block_mark or _mark_of(pending[-1])
            commands.append(Command(name, start, fence, text, mark))
            pending = []
        if pending:
            raise ValueError(f"{name}:{start}: a command that never ends: {pending[0]!r}")
    return commands


COMMANDS = [c for page in PAGES for c in commands_of(page)]


# -- what a case checks without running: marked commands and make targets -------------------------


def parse_tetherfed(argv: list[str]) -> None:
    """Parse a `tetherfed` argv as the command would (shell variables stand for 1); fail with
    argparse's message when it does not parse."""
    argv = [re.sub(r"\$\{?\w+\}?", "1", word) for word in argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[1:2] == ["coordinator"]:
                coordinator_args(argv[2:])
            else:
                build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        if exit_.code:
            pytest.fail(f"{shlex.join(argv)} does not parse: {err.getvalue().strip()}")


def makefile_rules() -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines with continuations joined) of the Makefile."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    recipe: list[str] | None = None
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("\t") and recipe is not None:
            recipe.append(line.strip())
            continue
        rule = re.match(r"^([\w.$()-]+(?:\s+[\w.$()-]+)*)\s*:(?![=:])\s*(.*)$", line)
        recipe = None
        if rule:
            recipe = []
            for target in rule.group(1).split():
                rules[target] = (rule.group(2).split(), recipe)
    return rules


def check_make(command: Command) -> None:
    """`make T…`: each target exists, and every `tetherfed` command in its recipe or its
    prerequisites' recipes parses."""
    rules = makefile_rules()
    seen: set[str] = set()
    todo = [w for w in command.argv[1:] if not w.startswith("-") and "=" not in w]
    assert todo, f"{command.id}: `make` with no target"
    while todo:
        target = todo.pop()
        if target in seen:
            continue
        seen.add(target)
        assert target in rules, f"{command.id}: the Makefile has no target {target!r}"
        prerequisites, recipe = rules[target]
        todo += [p for p in prerequisites if p in rules]
        for line in recipe:
            if "-m tetherfed.cli" in line:
                parse_tetherfed(["tetherfed", *shlex.split(line.split("-m tetherfed.cli", 1)[1])])
            todo += re.findall(r"\$\(MAKE\)\s+([\w-]+)", line)


# -- a reader's terminal ------------------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | None  # None: killed at its time limit
    out: str
    err: str

    def why(self, text: str) -> str:
        status = "did not finish in time" if self.rc is None else f"exited {self.rc}"
        return f"`{text}` {status}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


@dataclass
class Terminal:
    """One block's bash, folder, port and coordinator (see the module's docstring)."""

    folder: Path
    logs: Path
    env: dict[str, str]
    redis_url: str
    port: int = field(default_factory=free_port)
    done: dict[int, Outcome] = field(default_factory=dict)  # by command index in the block
    server: subprocess.Popen[bytes] | None = None
    server_of: str = ""
    count: int = 0
    dead: str = ""

    def __post_init__(self) -> None:
        (self.folder / "examples").symlink_to(ROOT / "examples")
        self.shell = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            cwd=self.folder,
            env=self.env,
            text=True,
            start_new_session=True,  # its own process group: a time limit kills all it started
        )
        self._write("set -o pipefail\n")

    def _write(self, text: str) -> None:
        assert self.shell.stdin is not None
        self.shell.stdin.write(text)
        self.shell.stdin.flush()

    def substitute(self, text: str) -> str:
        text = re.sub(rf"\b(127\.0\.0\.1|localhost):{DOC_PORT}\b", rf"\1:{self.port}", text)
        text = re.sub(rf"--port[ =]{DOC_PORT}\b", f"--port {self.port}", text)
        return text.replace(DOC_REDIS, self.redis_url)

    def run(self, text: str, timeout_s: float = COMMAND_TIMEOUT_S) -> Outcome:
        """Run `text` in the block's bash; its exit code and output."""
        if self.dead:
            return Outcome(-1, "", f"the terminal was killed by an earlier time limit: {self.dead}")
        self.count += 1
        out, err, rc = (self.logs / f"{self.count}.{s}" for s in ("out", "err", "rc"))
        self._write(f"{{\n{text}\n}} > {out} 2> {err} < /dev/null; echo $? > {rc}.part\n")
        self._write(f"mv {rc}.part {rc}\n")
        deadline = time.monotonic() + timeout_s
        while not rc.exists() and time.monotonic() < deadline and self.shell.poll() is None:
            time.sleep(0.1)
        if not rc.exists():  # Ctrl-C first, as a reader would, so a launcher stops its children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.shell.pid, signal.SIGINT)
            deadline = time.monotonic() + 15
            while not rc.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.dead = text.splitlines()[0]
            self._kill_shell()
            return Outcome(None, out.read_text(errors="replace"), err.read_text(errors="replace"))
        code = int(rc.read_text())
        return Outcome(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def start_server(self, text: str, label: str) -> Outcome:
        """Start a coordinator command in the background; its outcome once /readyz answers."""
        previous = self.stop_server()
        if previous is not None and previous.rc not in (0, 130):
            return Outcome(previous.rc, previous.out, f"{self.server_of} on Ctrl-C: {previous.err}")
        self.count += 1
        out, err = (self.logs / f"{self.count}.{s}" for s in ("out", "err"))
        with out.open("wb") as o, err.open("wb") as e:
            self.server = subprocess.Popen(
                ["bash", "-c", text],
                cwd=self.folder,
                env=self.env | {"TETHER_PORT": str(self.port)},
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.server_of = label
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = False
        while not ready and time.monotonic() < deadline and self.server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://127.0.0.1:{self.port}/readyz"
                ready = httpx.get(url, timeout=2).status_code == 200
            time.sleep(0.2)
        rc = 0 if ready else self.server.poll()
        return Outcome(rc, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def stop_server(self) -> Outcome | None:
        """Ctrl-C the coordinator of the block (its process group), as a reader would."""
        server, self.server = self.server, None
        if server is None:
            return None
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
                return Outcome(None, "", "did not stop within 30 s of Ctrl-C")
        rc = server.returncode
        return Outcome(130 if rc == -signal.SIGINT else rc, "", "")

    def _kill_shell(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.shell.pid, signal.SIGKILL)
        self.shell.wait(timeout=10)

    def close(self) -> None:
        self.stop_server()
        assert self.shell.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.shell.stdin.close()  # end of input: the shell exits
        try:
            self.shell.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill_shell()


class Terminals:
    """The terminals of the module's blocks, opened on first use, closed at the end."""

    def __init__(self, redis_url: str, tmp: pytest.TempPathFactory) -> None:
        self.redis_url, self.tmp = redis_url, tmp
        self.prefix = f"tfdocs:{uuid.uuid4().hex[:12]}:"
        self.open: dict[tuple[str, int], Terminal] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        self.env.pop("REDIS_URL", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.env["TETHER_KEY_PREFIX"] = self.prefix

    def of(self, command: Command) -> Terminal:
        key = (command.page, command.block)
        if key not in self.open:
            folder = self.tmp.mktemp(Path(command.page).stem)
            (folder / "logs").mkdir()
            (folder / "cwd").mkdir()
            self.open[key] = Terminal(folder / "cwd", folder / "logs", self.env, self.redis_url)
        return self.open[key]

    def close(self) -> None:
        for terminal in self.open.values():
            terminal.close()
        client = sync_client(self.redis_url)
        try:
            keys = list(client.scan_iter(match=glob_escape(self.prefix) + "*", count=1000))
            for i in range(0, len(keys), 500):
                client.unlink(*keys[i : i + 500])
        finally:
            client.close()


@pytest.fixture(scope="module")
def terminals(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminals]:
    registry = Terminals(redis_url, tmp_path_factory)
    yield registry
    registry.close()


def is_server(command: Command) -> bool:
    argv = command.argv
    return argv[:2] == ["tetherfed", "coordinator"] or argv[1:3] == ["-m", "tetherfed_coordinator"]


def run_in(terminal: Terminal, command: Command) -> Outcome:
    """Run one unmarked command in its block's terminal (what it presupposes first)."""
    text = terminal.substitute(command.text)
    if is_server(command):
        return terminal.start_server(text, command.id)
    for word in command.argv:
        given = GIVEN.get(word)
        if given and not (terminal.folder / word).exists():
            made = terminal.run(given)
            if made.rc != 0:
                return Outcome(made.rc, made.out, f"the stand-in for {word} failed: {made.err}")
    if f":{terminal.port}" in text and terminal.server is None:
        started = terminal.start_server(
            f"exec {shlex.quote(sys.executable)} -m tetherfed_coordinator --host 127.0.0.1 "
            f"--port {terminal.port} --redis-url {shlex.quote(terminal.redis_url)}",
            f"the coordinator {command.page} takes as running",
        )
        if started.rc != 0:
            return started
    return terminal.run(text)


def block_of(command: Command) -> list[Command]:
    return [c for c in COMMANDS if (c.page, c.block) == (command.page, command.block)]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_the_docs_command_runs(command: Command, terminals: Terminals) -> None:
    argv = command.argv
    if argv[:1] == ["make"]:
        check_make(command)
        return
    if command.mark:
        if argv[:1] != ["tetherfed"]:
            pytest.skip(command.mark)
        parse_tetherfed(argv)
        if argv[1:3] in DRY_RUNS and "--dry-run" not in argv:
            dry = subprocess.run(
                [*argv, "--dry-run"],
                cwd=terminals.of(command).folder,
                env=terminals.env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            outcome = Outcome(dry.returncode, dry.stdout, dry.stderr)
            assert dry.returncode == 0, f"{command.id} (--dry-run): " + outcome.why(command.text)
        return
    if command.page in WAITING_FOR_MARKS:
        pytest.skip(WAITING_FOR_MARKS[command.page])
    terminal = terminals.of(command)
    block = block_of(command)
    for before in block[: block.index(command)]:
        index = block.index(before)
        if before.mark or before.argv[:1] == ["make"] or index in terminal.done:
            continue
        terminal.done[index] = run_in(terminal, before)
        if terminal.done[index].rc != 0:
            pytest.fail(f"{command.id} comes after {before.id}, which failed")
    index = block.index(command)
    outcome = terminal.done.get(index) or run_in(terminal, command)
    terminal.done[index] = outcome
    assert outcome.rc == 0, f"{command.id}: " + outcome.why(terminal.substitute(command.text))


# -- the convention itself ------------------------------------------------------------------------


def test_marks_are_well_formed() -> None:
    """Every comment that looks like a mark is one (`# need: gpu` would silently run)."""
    problems = []
    for page in PAGES:
        for fence, body in bash_blocks(page):
            for i, line in enumerate(body.splitlines()):
                where = f"{page.relative_to(ROOT)}:{fence + 1 + i}"
                found = MARK.search(line)
                if found and (problem := check_mark(found.group(1), found.group(2))):
                    problems.append(f"{where}: {problem}")
                elif LOOKS_LIKE_A_MARK.search(line) and not found:
                    problems.append(f"{where}: write `# needs: <what>` or `# long: <why>`")
    assert not problems, "\n".join(problems)


def test_shell_commands_are_in_bash_blocks() -> None:
    """A command in a ```sh, ```console or unlabelled block would escape the tests."""
    escaped = []
    for page in PAGES:
        text = page.read_text()
        for found in FENCE.finditer(text):
            language, body = found.group(1), found.group(2)
            shell_like = re.search(r"^\$? ?(tetherfed|make|curl|python|docker) ", body, re.M)
            if language in ("sh", "shell", "console", "zsh", "bash-session") or (
                language in ("", "text") and shell_like
            ):
                line = text.count("\n", 0, found.start()) + 1
                escaped.append(f"{page.relative_to(ROOT)}:{line} ({language or 'no language'})")
    assert not escaped, f"shell commands outside ```bash blocks: {escaped}"


def test_pages_waiting_for_marks_still_need_them() -> None:
    for page, why in WAITING_FOR_MARKS.items():
        unmarked = [c.id for c in COMMANDS if c.page == page and not c.mark]
        assert unmarked, f"{page} is marked now: take it out of WAITING_FOR_MARKS ({why})"


def test_the_docs_have_commands_to_run() -> None:
    ran = [c for c in COMMANDS if not c.mark and c.argv[:1] != ["make"]]
    assert len(ran) >= 20, [c.id for c in ran]
