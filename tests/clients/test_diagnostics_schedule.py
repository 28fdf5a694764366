"""The `Diagnostics` helper: schedule, budget, files and telemetry points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tether_protocol.telemetry import METRICS, TelemetryPoint
from tetherfed import build_model, load_task, tether
from tetherfed.diagnostics import summarize
from tetherfed.diagnostics._recorder import Diagnostics, parse_spec


def train(diag: Diagnostics, model: torch.nn.Module, steps: int, per_epoch: int = 10) -> None:
    task = load_task("sin", seed=0)
    x, y = task.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        i = (step - 1) % per_epoch
        loss = task.loss_fn(model(x[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        diag.step(step, (step - 1) // per_epoch, loss.item())


def sin_model() -> torch.nn.Module:
    return tether(build_model("relu-chain-5555", load_task("sin"), seed=0), "static", seed=0)


def test_every_n_steps_writes_all_metrics_and_sends_valid_points(tmp_path: Path) -> None:
    model, points = sin_model(), []
    probe = load_task("sin").val.tensors[0][:8]
    diag = Diagnostics(
        model,
        every=40,
        out_dir=tmp_path,
        probe=probe,
        budget=1.0,
        sink=points.extend,
        last_step=100,
    )

    train(diag, model, 100)
    diag.close(100, 9)

    runs = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs] == [40, 80, 100]
    assert {p["metric"] for p in points} == set(METRICS)
    for p in points:
        TelemetryPoint.model_validate(p)  # what the coordinator accepts
    with safe_open(tmp_path / "diagnostics.safetensors", "numpy") as f:
        assert f.get_tensor("effective_rank/fc2").shape == (3,)
        # 32 updates of all 25 weights of fc2 before each run, the final one included
        assert f.get_tensor("update_fft/fc2/step").tolist() == [40, 80, 100]
        assert f.get_tensor("update_fft/fc2").shape == (3, 32 * 25 // 2 + 1)
        assert f.get_tensor("tracked_weights/model")[:, 0].tolist() == list(range(1, 101))
        assert json.loads(f.metadata()["tracked"]) == ["fc1.weight[0,0]", "fc2.weight[0,0]"]
        w = model.fc1.parametrizations.weight.original.detach()
        assert f.get_tensor("tracked_weights/model")[-1, 2] == pytest.approx(float(w[0, 0]))
    summary = summarize(tmp_path)
    assert summary["diagnostics_runs"] == 3 and summary["jacobian_radius"] > 0
    assert summary["gzip_ratio"] == runs[-1]["metrics"]["gzip_ratio"]["all"]


def test_epoch_schedule_labels_the_epoch_that_ended(tmp_path: Path) -> None:
    model = sin_model()
    diag = Diagnostics(model, out_dir=tmp_path, budget=1.0)

    train(diag, model, 35, per_epoch=10)

    runs = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in runs] == [(11, 0), (21, 1), (31, 2)]


def test_over_budget_runs_less_often_and_says_so_once(tmp_path: Path, caplog: Any) -> None:
    model = sin_model()
    diag = Diagnostics(model, every=1, out_dir=tmp_path, budget=0.001)

    train(diag, model, 60)

    lines = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    said = [r for r in lines if r["event"] == "diagnostics_budget"]
    assert len(said) == 1 and "running less often" in said[0]["message"]
    assert 1 <= diag.runs < 10 and diag.skipped == 60 - diag.runs
    assert sum("running less often" in m for m in caplog.messages) == 1


def test_resume_keeps_the_arrays_of_earlier_runs(tmp_path: Path) -> None:
    model = sin_model()
    first = Diagnostics(model, every=20, out_dir=tmp_path, budget=1.0)
    train(first, model, 40)

    again = Diagnostics(model, every=20, out_dir=tmp_path, budget=1.0)
    again.run(60, 5)

    with safe_open(tmp_path / "diagnostics.safetensors", "numpy") as f:
        assert f.get_tensor("gzip_ratio/all/step").tolist() == [20, 40, 60]
        assert f.get_tensor("tracked_weights/model").shape == (40, 4)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("every=epoch", {"every": "epoch"}), ("every=25,budget=0.1", {"every": 25, "budget": 0.1})],
)
def test_parse_spec(spec: str, expected: dict[str, Any]) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["every=0", "every=often", "budget=x", "colour=red"])
def test_parse_spec_refuses_bad_options(spec: str) -> None:
    with pytest.raises(ValueError, match="diagnostics"):
        parse_spec(spec)


def test_the_final_run_has_update_spectra_even_over_budget(tmp_path: Path) -> None:
    model = sin_model()
    diag = Diagnostics(model, every=20, out_dir=tmp_path, budget=0.001, last_step=100)

    train(diag, model, 100)
    diag.close(100, 9)

    with safe_open(tmp_path / "diagnostics.safetensors", "numpy") as f:
        assert f.get_tensor("gzip_ratio/all/step").tolist() == [20, 100]
        assert f.get_tensor("update_fft/fc3/step").tolist() == [100]  # 20 had 19 updates only


def test_results_rows_get_final_diagnostics_and_the_first_epoch_over_1(tmp_path: Path) -> None:
    from tetherfed.experiment._results import RunRecord, diagnostics_columns

    workers = [{"name": "worker-0"}, {"name": "worker-1"}, {"name": "worker-2"}]
    (tmp_path / "config.json").write_text(json.dumps({"workers": workers}))
    radii = {"worker-0": [0.5, 1.2, 0.9], "worker-1": [0.4, 0.8, 1.1]}  # worker-2: no diagnostics
    for name, values in radii.items():
        (tmp_path / name).mkdir()
        lines = [
            {
                "event": "diagnostics",
                "step": 10 * e,
                "epoch": e,
                "metrics": {
                    "effective_rank": {"fc1": 2.0, "fc2": 4.0},
                    "gzip_ratio": {"fc1": 0.5, "all": 0.8},
                    "jacobian_radius": {"model": r},
                },
            }
            for e, r in enumerate(values)
        ]
        (tmp_path / name / "diagnostics.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in lines)
        )
    run = RunRecord("r0", 0, "tether", 0, {}, tmp_path)

    columns = diagnostics_columns(run)

    assert columns == {
        "effective_rank": 3.0,
        "gzip_ratio": 0.8,
        "jacobian_radius": 1.0,
        "jacobian_first_epoch_over_1": 1,
    }
    assert diagnostics_columns(RunRecord("r1", 0, "tether", 0, {}, tmp_path / "none")) == {}
