"""Pages in a real headless browser: Debian's `chromium` driven by Playwright (never a browser
Playwright downloads), and one real ensemble (`tetherfed up` against a coordinator with a token)
shared by the report and dashboard tests. Screenshots go to tests/artifacts/ (git-ignored).

A browser that cannot start fails the tests under CI=true and skips them elsewhere."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pages_helpers import Ensemble

from tetherfed_coordinator.embedded import free_port
from tetherfed_coordinator.keys import glob_escape

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("TETHERFED_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-unsafe-swiftshader",
]


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's), one per session."""
    try:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
    except Exception as error:
        _unavailable(f"Playwright did not start: {error}")
    try:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
    except Exception as error:
        playwright.stop()
        _unavailable(f"headless Chromium at {CHROMIUM} did not start: {error}")
    yield chromium
    chromium.close()
    playwright.stop()


@dataclass
class PageLog:
    """What a page reported: console errors, uncaught exceptions, every request URL."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (own context); `page.log` is its `PageLog`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    log = PageLog()
    tab.on("console", lambda m: log.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: log.errors.append(str(e)))
    tab.on("request", lambda r: log.requests.append(r.url))
    tab.on(
        "response", lambda r: log.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    tab.log = log
    yield tab
    context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """tests/artifacts/, for screenshots."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the coordinator exited with code {proc.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"coordinator at {url} not ready in 30 s")


@pytest.fixture(scope="session")
def ensemble(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ensemble]:
    """A token-protected coordinator on a free port with its own key prefix (deleted afterwards)."""
    port, prefix = free_port(), f"tftest:{secrets.token_hex(6)}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {
        "TETHER_TOKEN": secrets.token_urlsafe(16),
        "TETHER_READ_TOKEN": secrets.token_urlsafe(16),
        "TETHER_KEY_PREFIX": prefix,
        "TETHER_SSE_KEEPALIVE_S": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "tetherfed_coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
    ]
    proc = subprocess.Popen(cmd, env=env)
    ens = Ensemble(
        f"http://127.0.0.1:{port}",
        env["TETHER_TOKEN"],
        env["TETHER_READ_TOKEN"],
        f"pics-{secrets.token_hex(3)}",
        tmp_path_factory.mktemp("pictures") / "run",
        proc,
    )
    try:
        _wait_ready(ens.url, proc)
        yield ens
    finally:
        ens.stop()
        client = redis.Redis.from_url(redis_url)
        with contextlib.closing(client):
            keys = list(client.scan_iter(match=glob_escape(prefix) + "*", count=1000))
            for i in range(0, len(keys), 500):
                client.unlink(*keys[i : i + 500])
