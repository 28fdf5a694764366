"""The README and the documentation pages say what the code does: the README stays short and its
Quick start is the two make targets; the SDK example and the curl session run as written against
a real coordinator on a free port (and show what they should); every relative link points at a
file that exists; the generated reference names every flag, setting and policy field; the code
points its readers at pages that exist. (`make docs-build` checks the site's own links,
--strict.)

Every shell command of a ```bash block runs in test_doc_commands.py, or is marked there as one a
test cannot run: a trailing `# needs: cluster|gpu|docker|network` or `# long: <why>` (that
module's docstring has the convention)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tetherfed import Client
from tetherfed.cli import build_parser
from tetherfed_coordinator.settings import Settings

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


def generated_reference() -> ModuleType:
    """docs/gen_ref.py as a module: its page functions, nothing written."""
    spec = importlib.util.spec_from_file_location("gen_ref", ROOT / "docs" / "gen_ref.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, Any]]:
    """(`tetherfed …` command, parser) for `parser` and every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def env_names(text: str) -> set[str]:
    return set(re.findall(r"\bTETHER_[A-Z][A-Z0-9_]*\b", text))


# TETHER_* names that are no coordinator setting: docker-compose.yml's worker variables.
NOT_SETTINGS = {"TETHER_MODE": "docker-compose.yml: the workers' --tether-mode"}


def test_the_reference_names_every_flag() -> None:
    cli = generated_reference().pages()["reference/cli.md"]
    sections = dict(re.findall(r"^## `(tetherfed[^`]*)`\n(.*?)(?=^## |\Z)", cli, re.M | re.S))
    flags = [
        (command, flag)
        for command, parser in parsers(build_parser(), "tetherfed")
        for action in parser._actions
        for flag in action.option_strings
    ]
    coordinator = (ROOT / "services/coordinator/tetherfed_coordinator/__main__.py").read_text()
    flags += [
        ("tetherfed coordinator", flag)
        for flag in re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", coordinator)
    ]
    missing = [f"{c} {f}" for c, f in flags if f not in sections.get(c, "")]
    assert len(flags) > 100 and not missing, f"not in reference/cli.md: {missing}"


def test_the_reference_names_every_setting() -> None:
    """Every setting, and every TETHER_* name the code, the compose file or a page mentions."""
    settings = generated_reference().pages()["reference/settings.md"]
    named = {f"TETHER_{f.upper()}" for f in Settings.model_fields}
    for folder in ("clients", "services", "tether_protocol", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if _is_str(n)]
            named |= env_names("\n".join(strings))
    for page in [ROOT / "README.md", ROOT / "docker-compose.yml", *PAGES]:
        named |= env_names(page.read_text())
    missing = [n for n in sorted(named - set(NOT_SETTINGS)) if f"`{n}`" not in settings]
    assert not missing, f"not in reference/settings.md: {missing}"
    for name, where in NOT_SETTINGS.items():
        assert name in (ROOT / "docker-compose.yml").read_text(), f"{name}: not in {where}"


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_the_reference_names_every_policy_field() -> None:
    """Every policy field, and the fields of the models it holds (gate.*, sketch.*)."""
    ref = generated_reference()
    policy = ref.pages()["reference/policy.md"]
    names = []
    for name, info in ref.Policy.model_fields.items():
        names.append(name)
        names += [f"{name}.{f}" for model in ref.nested_models(info) for f in model.model_fields]
    missing = [n for n in names if f"| `{n}` |" not in policy]
    assert "gate.probe_loss_rise" in names and not missing, f"not in reference/policy.md: {missing}"


def test_the_code_points_at_pages_that_exist() -> None:
    """The README is short now: the code sends its reader to a docs page (that exists), never
    to a README section."""
    wrong = []
    folders = ("clients", "services", "tether_protocol", "bench", "tests", "examples")
    files = [p for f in folders for p in (ROOT / f).rglob("*") if p.suffix in (".py", ".toml")]
    for path in [*files, ROOT / "Makefile", ROOT / "docker-compose.yml"]:
        if not path.is_file():
            continue
        text = path.read_text()
        where = path.relative_to(ROOT)
        for target in re.findall(r"\bdocs/[\w./-]+\.md\b", text):
            if not (ROOT / target).exists():
                wrong.append(f"{where}: {target} does not exist")
        for section in re.findall(r"README\W{0,3}[\"'][^\"'\n]+", text):
            wrong.append(f"{where}: {section}: point at the docs page instead")
    assert not wrong, "\n".join(wrong)
