"""The README and the documentation pages say what the code does: the README stays short and its
Quick start is the two make targets; every `tetherfed` command in them parses; the SDK example
and the curl session run as written against a real coordinator on a free port; every relative
link points at a file that exists. (`make docs-build` checks the site's own links, --strict.)"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tetherfed import Client
from tetherfed.cli import build_parser

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 150
# Pages docs/gen_ref.py writes when the site is built (never checked in).
GENERATED = {"cli.md", "settings.md", "policy.md", "openapi.md", "openapi.json", "metrics.md"}


def blocks(language: str, text: str | None = None) -> list[str]:
    """Code blocks of `language` in `text`, or in the README and every page."""
    texts = [text] if text is not None else [README, *(p.read_text() for p in PAGES)]
    return [b for t in texts for b in re.findall(rf"```{language}\n(.*?)```", t, flags=re.S)]


def section(title: str, text: str = README) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_readme_is_short_and_its_links_resolve() -> None:
    assert len(README.splitlines()) <= MAX_README_LINES
    for page in [ROOT / "README.md", *PAGES]:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose):
            path = (page.parent / target).resolve()
            generated = path.parent == ROOT / "docs" / "reference" and path.name in GENERATED
            assert path.exists() or generated, f"{page.relative_to(ROOT)} links {target}"


def test_quick_start_is_exactly_two_make_targets_that_exist() -> None:
    (quick,) = re.findall(r"```bash\n(.*?)```", section("Quick start"), flags=re.S)
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_tetherfed_command_in_the_readme_parses() -> None:
    commands = []
    for block in blocks("bash"):
        joined = block.replace("\\\n", " ")
        commands += [
            line.split("#")[0].strip()
            for line in joined.splitlines()
            if line.strip().startswith("tetherfed ")
        ]
    assert len(commands) >= 4
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "coordinator":
            out = subprocess.run(
                [sys.executable, "-m", "tetherfed_coordinator", *argv[1:], "--help"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert out.returncode == 0, out.stderr
        else:
            build_parser().parse_args(argv)


def test_the_sdk_example_runs_as_written(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    coordinator = coordinator_process()
    with Client(coordinator.url) as api:
        api.create_federation("demo")
    (example,) = [b for b in blocks("python", README) if "tetherfed.Federation" in b]
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8420", coordinator.url))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    with Client(coordinator.url) as api:
        (worker,) = api.list_workers("demo").data
        assert worker.snapshot_version >= 1, "the example never published"
        assert worker.status == "left", "the example did not leave cleanly"


def test_the_curl_session_works_as_written(
    coordinator_process: Callable[..., Any], tmp_path: Path
) -> None:
    coordinator = coordinator_process()
    (session,) = blocks("bash", (ROOT / "docs" / "how-to" / "curl.md").read_text())
    host = coordinator.url.removeprefix("http://").replace("127.0.0.1", "localhost")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", session.replace("localhost:8420", host)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert '"measure":"pearson"' in out.stdout
    assert '"action":"merge"' in out.stdout, out.stdout
    with Client(coordinator.url) as api:
        matrix = api.compatibility("demo", layer="fc")
        assert matrix.matrix[0][1] == pytest.approx(1.0)
