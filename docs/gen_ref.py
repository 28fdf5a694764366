"""Generate the reference pages from the code at build time (mkdocs-gen-files): the CLI from its
argparse parsers, settings from the coordinator's `Settings`, policy fields from `Policy`, the
REST API from the app's OpenAPI schema, and metric names from the Prometheus registries. Nothing
here is written by hand, so the pages cannot drift from the code; tests/integration/test_docs.py
imports this file (without writing anything) to check every flag, setting and policy field is
on its page."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import typing
from collections.abc import Iterator
from typing import Any

import mkdocs_gen_files
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tether_protocol.messages import Policy
from tetherfed.cli import build_parser
from tetherfed_coordinator.__main__ import parse_args as coordinator_args
from tetherfed_coordinator.app import create_app
from tetherfed_coordinator.metrics import ApiMetrics, ScoringMetrics
from tetherfed_coordinator.settings import Settings


def _subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, str]]:
    """(command, help text) for `parser` and every subcommand below it, depth first."""
    yield prefix, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{prefix} {name}")


def _help_of(run: Any) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        run()
    return out.getvalue()


def cli_page() -> str:
    lines = [
        "# Command line",
        "",
        "Every `tetherfed` command and flag, as `--help` prints it (generated from the parsers).",
        "",
    ]
    for command, usage in _subcommands(build_parser(), "tetherfed"):
        # `tetherfed coordinator` hands its argv to the coordinator's own parser.
        text = _help_of(lambda: coordinator_args(["--help"])) if "coordinator" in command else usage
        lines += [f"## `{command}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _type_name(info: FieldInfo) -> str:
    annotation = info.annotation
    if typing.get_origin(annotation) is typing.Literal:  # the choices, not "Literal"
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(computed)"
    return f"`{info.default!r}`"


def nested_models(info: FieldInfo) -> list[type[BaseModel]]:
    """The pydantic models a field holds (`gate: MergeGate | None` holds MergeGate)."""
    args = typing.get_args(info.annotation) or (info.annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def fields_table(model: type[BaseModel], name_of: Any) -> list[str]:
    rows = ["| name | type | default | meaning |", "|---|---|---|---|"]
    for field, info in model.model_fields.items():
        rows.append(
            f"| `{name_of(field)}` | `{_cell(_type_name(info))}` | {_cell(_default(info))} "
            f"| {_cell(info.description)} |"
        )
    return rows


def setting_names(field: str) -> str:
    """The variables a setting is read from: TETHER_<FIELD>, or its aliases (REDIS_URL)."""
    info = Settings.model_fields[field]
    aliases = getattr(info.validation_alias, "choices", None) or []
    names = [a for a in aliases if isinstance(a, str) and a.isupper()]
    return "` or `".join(names or [f"{Settings.model_config.get('env_prefix', '')}{field.upper()}"])


def settings_page() -> str:
    return "\n".join(
        [
            "# Settings",
            "",
            "The coordinator reads these environment variables at start-up (pydantic-settings; "
            "an empty value means unset). Command-line flags of `tetherfed coordinator` override "
            "the ones they name.",
            "",
            *fields_table(Settings, setting_names),
            "",
        ]
    )


def policy_page() -> str:
    lines = [
        "# Policy fields",
        "",
        "A federation's policy (`tether_protocol.messages.Policy`): set it at creation, "
        "change it with `PATCH /v1/federations/{name}/policy`.",
        "",
        *fields_table(Policy, lambda f: f),
        "",
    ]
    for name, info in Policy.model_fields.items():
        for model in nested_models(info):
            doc = " ".join(inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].split())
            lines += [f"## `{name}`: {model.__name__}", "", doc, ""]
            lines += [*fields_table(model, lambda f, name=name: f"{name}.{f}"), ""]
    return "\n".join(lines)


def openapi_page(schema: dict[str, Any]) -> str:
    lines = [
        "# REST API",
        "",
        "Every route of the coordinator, from its OpenAPI schema "
        "([openapi.json](openapi.json); a running coordinator also serves it at "
        "`/openapi.json` and `/docs`).",
        "",
        "| method | path | summary |",
        "|---|---|---|",
    ]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            summary = operation.get("summary") or operation.get("description", "").split("\n")[0]
            lines.append(f"| {method.upper()} | `{path}` | {_cell(summary)} |")
    return "\n".join([*lines, ""])


def metrics_page() -> str:
    lines = [
        "# Metrics",
        "",
        "What `GET /metrics` exposes (Prometheus text format), from the coordinator's registries.",
        "",
        "| name | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    for kind in (ApiMetrics, ScoringMetrics):
        registry = CollectorRegistry()
        kind(registry)
        for metric in registry.collect():
            labels = sorted({k for s in metric.samples for k in s.labels if k != "le"})
            lines.append(
                f"| `{metric.name}` | {metric.type} | {', '.join(labels) or '-'} "
                f"| {_cell(metric.documentation)} |"
            )
    return "\n".join([*lines, ""])


def pages() -> dict[str, str]:
    """Every generated page, by its path under docs/."""
    schema = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    return {
        "reference/cli.md": cli_page(),
        "reference/settings.md": settings_page(),
        "reference/policy.md": policy_page(),
        "reference/openapi.md": openapi_page(schema),
        "reference/openapi.json": json.dumps(schema, indent=2),
        "reference/metrics.md": metrics_page(),
    }


def main() -> None:
    for path, text in pages().items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)


# mkdocs-gen-files runs this file with runpy.run_path (as "<run_path>"); the tests import it.
if __name__ in ("__main__", "<run_path>"):
    main()
