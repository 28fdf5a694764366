"""The CI-sized chaos run: `make chaos` kills every part 20 times, this run twice each (see
run_chaos.py for the ensemble, the kills and the invariants)."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_chaos import TARGETS, Config, run

pytestmark = [pytest.mark.integration, pytest.mark.torch]


@pytest.mark.timeout(1800)  # a loaded machine; a quiet one takes about a minute
def test_kill_9_of_workers_coordinator_scorer_and_redis_loses_nothing(tmp_path: Path) -> None:
    result = run(Config(kills=2, workers=2, seed=12, recover_s=300, out=tmp_path / "chaos"))

    assert result.kills == dict.fromkeys(TARGETS, 2), f"kills that happened: {result.kills}"
    assert result.violations == [], "\n".join(result.violations)
    figures = result.figures
    assert figures["worker_resumes"] == 2, figures
    assert figures["decisions_acked"] > 0 and figures["applied_by_workers"] > 0, figures
