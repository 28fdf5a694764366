"""`tetherfed.experiment._results` columns from a run folder: merges within/across groups and the gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tetherfed.experiment._results import (
    RunRecord,
    build_row,
    cluster_columns,
    loss_columns,
    merge_columns,
    pace_columns,
    read_csv,
    summarize,
    write_csv,
)

GROUPS = {"w0": "sin", "w1": "sin", "w2": "pw", "w3": "pw"}


def _decision(
    i: int, worker: str, partner: str, ack: dict[str, Any] | None, action: str = "merge"
) -> dict[str, Any]:
    return {
        "id": i,
        "worker_id": f"{worker}-id",
        "partner_id": f"{partner}-id",
        "action": action,
        "ack": ack,
    }


def _run_folder(folder: Path, decisions: list[dict[str, Any]]) -> RunRecord:
    workers = [{"name": n, "group": g} for n, g in GROUPS.items()]
    (folder / "config.json").write_text(json.dumps({"workers": workers}))
    summary_workers = [{**w, "worker_id": f"{w['name']}-id"} for w in workers]
    edges: dict[tuple[str, str], int] = {}
    for d in decisions:
        if d["action"] == "merge":
            key = (d["worker_id"][:-3], d["partner_id"][:-3])
            edges[key] = edges.get(key, 0) + 1
    graph = [{"worker": a, "partner": b, "merges": n} for (a, b), n in edges.items()]
    (folder / "summary.json").write_text(
        json.dumps({"workers": summary_workers, "merge_graph": graph})
    )
    (folder / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    return RunRecord("r", 0, "federated", 0, {}, folder)


def test_merges_are_split_by_group_and_the_gate_figures_come_from_the_acks(tmp_path: Path) -> None:
    kept = {"outcome": "applied", "probe_loss_before": 0.2, "probe_loss_after": 0.201}
    better = {"outcome": "applied", "probe_loss_before": 0.4, "probe_loss_after": 0.3}
    rolled = {"outcome": "rejected", "probe_loss_before": 0.2, "probe_loss_after": 0.5}
    stale = {"outcome": "rejected", "reason": "partner snapshot is stale"}
    ungated = {"outcome": "applied"}
    run = _run_folder(
        tmp_path,
        [
            _decision(1, "w0", "w1", kept),
            _decision(2, "w2", "w3", better),
            _decision(3, "w0", "w2", rolled),
            _decision(4, "w1", "w3", stale),
            _decision(5, "w3", "w2", None),
            _decision(6, "w1", "w0", ungated),
            _decision(7, "w1", "w2", None, action="hold"),
        ],
    )

    columns = merge_columns(run)

    rise = columns.pop("gate_max_kept_rise")
    assert rise == pytest.approx(0.005)
    assert columns == {
        "merges_within": 4,
        "merges_across": 2,
        "kept_within": 3,
        "kept_across": 0,
        "merges_unacked": 1,
        "gate_checked": 3,
        "gate_rolled_back": 1,
        "ari_kept": 1.0,
    }
    assert cluster_columns(run)["ari"] == 1.0  # decided: 4 within outweigh 2 across


def test_ari_kept_counts_only_the_merges_the_workers_applied(tmp_path: Path) -> None:
    kept = {"outcome": "applied", "probe_loss_before": 0.2, "probe_loss_after": 0.2}
    rolled = {"outcome": "rejected", "probe_loss_before": 0.2, "probe_loss_after": 0.5}
    run = _run_folder(
        tmp_path,
        [
            *(_decision(i, "w0", "w1", rolled) for i in range(3)),
            *(_decision(i, "w2", "w3", rolled) for i in range(3, 6)),
            _decision(6, "w0", "w2", kept),
            _decision(7, "w1", "w3", kept),
        ],
    )

    columns = merge_columns(run)

    assert cluster_columns(run)["ari"] == 1.0
    assert columns["ari_kept"] < 0.5
    assert (columns["kept_within"], columns["kept_across"]) == (0, 2)
    assert columns["gate_max_kept_rise"] == 0.0


def test_no_decisions_give_zeros_and_no_summary_gives_empty_columns(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    run = _run_folder(tmp_path / "a", [])

    columns = merge_columns(run)

    assert columns["merges_within"] == columns["gate_checked"] == 0
    assert columns["gate_max_kept_rise"] is None and columns["ari_kept"] == 0.0
    empty = merge_columns(RunRecord("r", 0, "federated", 0, {}, tmp_path / "none"))
    assert set(empty.values()) == {None}


def test_summary_carries_the_new_columns_with_confidence_intervals() -> None:
    rows = [
        {
            "cell": 0,
            "arm": "federated",
            "repeat": r,
            "state": "finished",
            "val_loss": 0.1,
            "merges_within": w,
            "gate_max_kept_rise": 0.001 * r,
        }
        for r, w in enumerate([2, 4, 6])
    ]

    (summary,) = summarize(rows)

    assert summary["merges_within_mean"] == 4.0 and summary["merges_within_ci95"] > 0
    assert summary["gate_max_kept_rise_mean"] == pytest.approx(0.001)


def _worker_events(folder: Path, finals: dict[str, tuple[float, float]]) -> RunRecord:
    """A run folder whose workers end at (val_loss, val_acc); the last step event carries the
    metrics of an earlier evaluation, the done event the final ones."""
    (folder / "config.json").write_text(json.dumps({"workers": [{"name": n} for n in finals]}))
    for name, (loss, acc) in finals.items():
        events = [
            {"event": "step", "step": 10, "loss": 1.0, "val_loss": 9.0, "val_acc": 0.0},
            {"event": "done", "steps": 10, "val_loss": loss, "val_acc": acc},
        ]
        (folder / name).mkdir()
        (folder / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return RunRecord("r", 0, "federated", 0, {}, folder)


def test_task_metrics_and_the_worst_worker_come_from_the_workers_final_events(
    tmp_path: Path,
) -> None:
    run = _worker_events(tmp_path, {"w0": (0.5, 0.9), "w1": (1.5, 0.6), "w2": (1.0, 0.7)})

    columns = loss_columns(run)

    assert columns["val_loss"] == pytest.approx(1.0)
    assert columns["val_acc"] == pytest.approx(0.7333333)
    assert columns["worst_val_loss"] == 1.5  # the highest loss among the workers
    assert columns["worst_val_acc"] == 0.6  # the lowest accuracy
    assert list(columns) == [
        "train_loss",
        "val_loss",
        "val_acc",
        "steps_per_s",
        "worst_val_loss",
        "worst_val_acc",
    ]


def test_a_run_without_task_metrics_has_only_the_loss_columns(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"workers": [{"name": "w0"}]}))
    (tmp_path / "w0").mkdir()
    (tmp_path / "w0" / "metrics.jsonl").write_text('{"event":"done","val_loss":0.25}\n')
    columns = loss_columns(RunRecord("r", 0, "federated", 0, {}, tmp_path))
    assert columns["worst_val_loss"] == 0.25 and "worst_val_acc" not in columns


def test_pace_columns_average_the_workers_final_publishes_skips_and_merge_rate(
    tmp_path: Path,
) -> None:
    # the last step line is older than the done line: the done line's figures win
    finals = {"w0": (12, 18, 2.0), "w1": (30, 0, 4.0)}
    (tmp_path / "config.json").write_text(json.dumps({"workers": [{"name": n} for n in finals]}))
    for name, (sent, skipped, rate) in finals.items():
        step = {"event": "step", "publishes": 1, "publishes_skipped": 1, "merges_per_100_steps": 9}
        done = {
            "event": "done",
            "val_loss": 0.5,
            "publishes": sent,
            "publishes_skipped": skipped,
            "merges_per_100_steps": rate,
        }
        (tmp_path / name).mkdir()
        lines = "".join(json.dumps(e) + "\n" for e in (step, done))
        (tmp_path / name / "metrics.jsonl").write_text(lines)
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished"}))
    run = RunRecord("r", 0, "federated", 0, {}, tmp_path)

    assert pace_columns(run) == {
        "publishes": 21.0,
        "publishes_skipped": 9.0,
        "merges_per_100_steps": 3.0,
    }
    write_csv(tmp_path / "results.csv", [build_row(run)])
    (row,) = read_csv(tmp_path / "results.csv")
    assert (row["publishes"], row["publishes_skipped"], row["merges_per_100_steps"]) == (
        21.0,
        9.0,
        3.0,
    )
    (summary,) = summarize([row])
    assert summary["publishes_skipped_mean"] == 9.0 and summary["merges_per_100_steps_mean"] == 3.0


def test_pace_columns_are_empty_when_no_worker_reported_them(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"workers": [{"name": "w0"}]}))
    (tmp_path / "w0").mkdir()
    (tmp_path / "w0" / "metrics.jsonl").write_text('{"event":"done","val_loss":0.25}\n')
    columns = pace_columns(RunRecord("r", 0, "federated", 0, {}, tmp_path))
    assert columns == dict.fromkeys(("publishes", "publishes_skipped", "merges_per_100_steps"))


def _arm_rows(arm: str, accs: list[float], cell: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "cell": cell,
            "arm": arm,
            "repeat": r,
            "state": "finished",
            "val_loss": 1.0 - acc,
            "val_acc": acc,
            "worst_val_loss": 1.2 - acc,
            "worst_val_acc": acc - 0.2,
        }
        for r, acc in enumerate(accs)
    ]


def test_summary_pairs_every_metric_against_the_reference_and_scores_the_oracle_gain() -> None:
    rows = (
        _arm_rows("fedavg", [0.5, 0.6, 0.7])
        + _arm_rows("federated", [0.6, 0.8, 0.7])
        + _arm_rows("oracle", [0.9, 0.9, 0.9])
    )

    summary = {s["arm"]: s for s in summarize(rows, reference="fedavg")}

    federated = summary["federated"]
    assert federated["reference_arm"] == "fedavg"
    for metric, sign in [("val_acc", 1), ("val_loss", -1), ("worst_val_acc", 1)]:
        assert federated[f"{metric}_diff_n"] == 3
        assert federated[f"{metric}_diff_mean"] == pytest.approx(sign * 0.1), metric
        assert federated[f"{metric}_diff_ci95"] > 0
        assert federated[f"{metric}_oracle_recovered"] == pytest.approx(1 / 3), metric
    assert federated["val_acc_mean"] == pytest.approx(0.7) and federated["val_acc_ci95"] > 0
    assert federated["worst_val_loss_mean"] == pytest.approx(0.5)
    assert "val_acc_diff_n" not in summary["fedavg"]  # the reference is not paired with itself
    assert summary["fedavg"]["val_acc_oracle_recovered"] == 0
    assert summary["oracle"]["val_loss_oracle_recovered"] == pytest.approx(1.0)


def test_without_an_oracle_arm_the_recovered_fraction_is_empty() -> None:
    rows = _arm_rows("independent", [0.5, 0.6]) + _arm_rows("federated", [0.6, 0.7])
    summary = {s["arm"]: s for s in summarize(rows)}
    assert summary["federated"]["val_acc_diff_mean"] == pytest.approx(0.1)
    assert summary["federated"]["val_acc_oracle_recovered"] is None
    assert summary["federated"]["reference_arm"] == "independent"


def test_preload_imports_every_module_writing_results_imports_lazily() -> None:
    """An interrupt landing in a first import left a half-initialised networkx behind, and
    writing results on the way out then crashed (exit 1 instead of 130): `experiment.run`
    imports them all before its sweep starts. Checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from tetherfed.experiment import _results\n"
        "assert 'networkx' not in sys.modules and 'sklearn.metrics' not in sys.modules\n"
        "_results.preload()\n"
        "print([m for m in _results.LAZY_MODULES if m not in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
