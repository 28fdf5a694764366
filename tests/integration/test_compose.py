"""docker-compose.yml without a Docker engine: validated against the official Compose
specification schema (check-jsonschema's vendored `vendor.compose-spec`), and every service
command parsed by the real parser of the entry point it names, so a typo fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tetherfed.cli import build_parser
from tetherfed_coordinator.__main__ import parse_args as coordinator_args

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def interpolate(value: str) -> str:
    """Compose's own `${VAR:-default}` interpolation (with the defaults; `$$` escapes `$`)."""
    value = INTERPOLATION.sub(
        lambda m: os.environ.get(m.group(1), m.group(2) or ""), value.replace("$$", "\0")
    )
    return value.replace("\0", "$")


def command(service: str) -> list[str]:
    return [interpolate(part) for part in compose()["services"][service]["command"]]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        str(path),
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_specification() -> None:
    result = validate(COMPOSE)
    assert result.returncode == 0, (
        f"compose-spec validation failed:\n{result.stdout}{result.stderr}"
    )


def test_the_validator_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    result = validate(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout, result.stdout


def test_redis_has_aof_and_a_healthcheck_and_gates_the_coordinator() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    coordinator = services["coordinator"]
    assert coordinator["depends_on"]["redis"]["condition"] == "service_healthy"
    assert coordinator["ports"], "the coordinator's port should be published"


def test_images_are_built_from_the_dockerfiles_of_their_deployables() -> None:
    services = compose()["services"]
    coordinator, worker = services["coordinator"]["build"], services["worker"]["build"]
    assert coordinator == {"context": ".", "dockerfile": "services/coordinator/Dockerfile"}
    assert worker == {"context": ".", "dockerfile": "clients/python/Dockerfile"}
    worker_dockerfile = (ROOT / worker["dockerfile"]).read_text()
    assert "FROM python:3.11-slim" in worker_dockerfile
    assert (
        "download.pytorch.org/whl/cpu" in worker_dockerfile and '".[worker]"' in worker_dockerfile
    )
    coordinator_dockerfile = ROOT / coordinator["dockerfile"]
    assert coordinator_dockerfile.exists(), f"{coordinator_dockerfile} is missing"
    installs = [ln for ln in coordinator_dockerfile.read_text().splitlines() if "pip install" in ln]
    assert installs, "the coordinator image installs nothing"
    assert not [ln for ln in installs if "torch" in ln or "worker" in ln], (
        "the coordinator needs no torch"
    )


def test_workers_scale_and_gpu_reservation_is_shown() -> None:
    services = compose()["services"]
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_coordinator_command_parses() -> None:
    cmd = command("coordinator")
    assert cmd[:3] == ["python", "-m", "tetherfed_coordinator"], cmd
    args = coordinator_args(cmd[3:])
    assert (args.host, args.port, args.redis_url) == ("0.0.0.0", 8420, "redis://redis:6379/0")


def test_federation_init_command_parses() -> None:
    cmd = command("federation")
    assert cmd[0] == "tetherfed", cmd
    args = build_parser().parse_args(cmd[1:])
    assert (args.command, args.action, args.coordinator) == (
        "federation",
        "create",
        "http://coordinator:8420",
    )
    assert (args.name, args.policy) == ("compose", "demo")


@pytest.mark.parametrize("service", ["worker", "worker-gpu"])
def test_worker_command_parses_as_the_shell_expands_it(service: str, tmp_path: Path) -> None:
    # Prepare: run the service's `sh -c` script with its environment, `tetherfed` on PATH being a
    # stub that prints its argv, then parse that argv with the real `tetherfed` parser.
    spec = compose()["services"][service]
    stub = tmp_path / "tetherfed"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {k: interpolate(str(v)) for k, v in spec["environment"].items()}
    env["PATH"] = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    cmd = command(service)
    assert cmd[:2] == ["sh", "-c"] and shutil.which("sh"), cmd

    # Execute
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=30)

    # Assert
    assert result.returncode == 0, result.stderr
    args = build_parser().parse_args(json.loads(result.stdout))
    assert args.command == "worker" and args.coordinator == "http://coordinator:8420"
    assert args.seed > 0 and args.steps == int(env["STEPS"]) and args.device == env["DEVICE"]
    assert str(args.checkpoint_dir).startswith("/runs/")
