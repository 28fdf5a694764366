"""The experiment spec: validation errors name the key, grid and zip expansion, paired seeds,
run ids, overrides, and the built-in examples (pure: no processes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tetherfed import experiment
from tetherfed.experiment._spec import SpecError, expand, parse_override, set_dotted

pytestmark = pytest.mark.torch  # the task check imports the task table


def base() -> dict[str, Any]:
    return {
        "experiment": {"name": "t", "repeats": 2, "steps": 10},
        "arms": ["federated", "independent"],
        "groups": [
            {"name": "sin", "count": 2, "task": "sin"},
            {"name": "sinc", "count": 1, "task": "sinc", "lr": 0.01},
        ],
    }


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        expand(raw)
    return str(info.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r["experiment"].update(colour="red"), "experiment.colour: unknown key"),
        (
            lambda r: r["groups"][0].update(lr="fast"),
            "groups[0](sin).lr: Input should be a valid number",
        ),
        (
            lambda r: r["groups"][1].update(task="mnist"),
            "groups[1](sinc).task: Value error, unknown task 'mnist'",
        ),
        (lambda r: r.update(groups=[]), "groups: List should have at least 1 item"),
        (lambda r: r.update(policy={"merge_treshold": 0.3}), "policy.merge_treshold: unknown key"),
        (lambda r: r.update(arms=["federated", "fedprox"]), "arms: unknown arm(s) ['fedprox']"),
        (
            lambda r: r.update(arm={"fedavg": {"base": "federated"}}),
            "cannot redefine the built-in arm(s) ['fedavg']",
        ),
        (
            lambda r: r.update(arm={"soft": {"base": "federated", "policy": {"merge_alpha": 2}}}),
            "arm.soft.policy.merge_alpha: Input should be less than or equal to 1",
        ),
        (lambda r: r.update(grid={"policy.merge_threshold": []}), "has no values"),
        (
            lambda r: r.update(grid={"groups.sin.colour": [1, 2]}),
            "groups[0](sin).colour: unknown key",
        ),
        (
            lambda r: r["groups"][0].update(shard={"size": 0}),
            "groups[0](sin).shard.size: Input should be greater than or equal to 1",
        ),
        (
            lambda r: r["groups"][0].update(shard={"size": 5, "scheme": "random"}),
            "groups[0](sin).shard.scheme: Input should be 'disjoint' or 'iid'",
        ),
        (
            lambda r: r["groups"][0].update(task="digits-rot", task_args={"kk": 2}),
            "groups[0](sin): Value error, task 'digits-rot' takes no argument 'kk'",
        ),
        (
            lambda r: r["experiment"].update(reference_arm="fedavg"),
            "Value error, experiment.reference_arm 'fedavg' is not one of the arms",
        ),
    ],
)
def test_invalid_specs_name_the_key(change: Any, expected: str) -> None:
    raw = base()
    change(raw)
    assert expected in error_of(raw)


def test_grid_is_a_full_product_and_zip_axes_move_together() -> None:
    raw = base()
    raw["grid"] = {"policy.merge_threshold": [0.2, 0.5], "groups.sin.lr": [1e-3, 3e-3, 1e-2]}
    raw["zip"] = [{"experiment.steps": [10, 20], "experiment.publish_every": [2, 4]}]

    spec, runs = expand(raw)

    cells = {r.cell: r.params for r in runs}
    assert len(cells) == 2 * 3 * 2 and len(runs) == 12 * 2 * 2  # cells × arms × repeats
    assert {(p["experiment.steps"], p["experiment.publish_every"]) for p in cells.values()} == {
        (10, 2),
        (20, 4),
    }
    one = next(
        r
        for r in runs
        if r.params["groups.sin.lr"] == 1e-2 and r.params["policy.merge_threshold"] == 0.5
    )
    assert one.plan.policy.merge_threshold == 0.5
    assert [w.options.lr for w in one.plan.workers] == [1e-2, 1e-2, 0.01]
    assert spec.experiment.name == "t"


def test_seeds_are_paired_within_a_repeat_and_differ_across_repeats() -> None:
    raw = base()
    raw["init"] = "shared"
    raw["grid"] = {"policy.merge_threshold": [0.2, 0.5]}
    _spec, runs = expand(raw)

    def seeds(r: Any) -> list[tuple[int, int]]:
        return [(w.init_seed, w.data_seed) for w in r.plan.workers]

    for repeat in (0, 1):
        same = {tuple(seeds(r)) for r in runs if r.repeat == repeat}
        assert len(same) == 1, f"repeat {repeat}: every cell and arm should share seeds, got {same}"
    first, second = (next(r for r in runs if r.repeat == k) for k in (0, 1))
    assert seeds(first) != seeds(second)
    assert len({w.init_seed for w in first.plan.workers}) == 1, "shared init: one init seed"
    assert len({w.data_seed for w in first.plan.workers}) == 3, "data seeds stay distinct"


def test_workers_are_planned_with_their_place_and_group_shards_and_task_args() -> None:
    raw = base()
    raw["groups"][0].update(task="digits-perm", task_args={"k": 2}, shard={"size": 30})
    raw["experiment"]["reference_arm"] = "federated"

    spec, runs = expand(raw)

    workers = runs[0].plan.workers
    assert [(w.index, w.group_index, w.index_in_group, w.group_size) for w in workers] == [
        (0, 0, 0, 2),
        (1, 0, 1, 2),
        (2, 1, 0, 1),
    ]
    assert workers[0].options.task_args == {"k": 2}
    assert workers[0].options.shard is not None and workers[0].options.shard.size == 30
    assert workers[0].options.shard.scheme == "disjoint" and workers[2].options.shard is None
    assert spec.experiment.reference_arm == "federated"
    assert experiment.reference_arm(raw) == "federated"
    assert experiment.reference_arm(base()) == "independent"


def test_run_ids_hash_the_resolved_run_and_arms_set_the_policy() -> None:
    _spec, runs = expand(base())
    _spec, again = expand(copy.deepcopy(base()))
    assert [r.run_id for r in runs] == [r.run_id for r in again]
    assert len({r.run_id for r in runs}) == len(runs) == 4
    changed = base()
    changed["experiment"]["steps"] = 11
    assert not {r.run_id for r in expand(changed)[1]} & {r.run_id for r in runs}
    independent = next(r for r in runs if r.arm == "independent").plan.policy
    assert independent.trigger == "plateau" and independent.loss_epsilon == 0.0


def test_named_arms_apply_their_overrides_then_their_base_arm() -> None:
    raw = base() | {
        "arms": ["independent", "oracle", "fedavg", "federated-model", "oracle-model"],
        "arm": {
            "federated-model": {"base": "federated", "policy": {"merge_scope": "model"}},
            # an override the base arm's own rule wins over: oracle always averages by group
            "oracle-model": {
                "base": "oracle",
                "policy": {"merge_scope": "model", "fedavg_within": "federation"},
            },
        },
    }
    raw["experiment"] |= {"repeats": 1, "fedavg_every": 20}
    policies = {r.arm: r.plan.policy for r in expand(raw)[1]}
    assert (policies["oracle"].fedavg_every, policies["oracle"].fedavg_within) == (20, "group")
    assert (policies["fedavg"].fedavg_every, policies["fedavg"].fedavg_within) == (20, "federation")
    assert policies["federated-model"].merge_scope == "model"
    assert policies["federated-model"].fedavg_every is None
    assert policies["oracle-model"].merge_scope == "model"
    assert policies["oracle-model"].fedavg_within == "group"
    assert policies["independent"].merge_scope == "tethers"


def test_group_options_inherit_steps_and_publish_every_unless_set() -> None:
    raw = base()
    raw["experiment"]["publish_every"] = 3
    raw["groups"][1]["steps"] = 99
    _spec, runs = expand(raw)
    workers = runs[0].plan.workers
    assert [(w.options.steps, w.options.publish_every) for w in workers] == [
        (10, 3),
        (10, 3),
        (99, 3),
    ]
    assert [w.group for w in workers] == ["sin", "sin", "sinc"]


def test_io_budget_is_inherited_checked_and_left_out_of_run_ids_at_its_default() -> None:
    _spec, runs = expand(base())
    assert {w.options.io_budget for r in runs for w in r.plan.workers} == {0.05}
    raw = base()
    raw["experiment"]["io_budget"] = 0.05  # the default, spelled out: the same runs
    assert [r.run_id for r in expand(raw)[1]] == [r.run_id for r in runs]
    raw["experiment"]["io_budget"] = 0.5
    raw["groups"][1]["io_budget"] = 1.0
    _spec, changed = expand(raw)
    assert [w.options.io_budget for w in changed[0].plan.workers] == [0.5, 0.5, 1.0]
    assert not {r.run_id for r in changed} & {r.run_id for r in runs}
    raw["groups"][0]["io_budget"] = 0
    assert "groups[0](sin).io_budget: Input should be greater than 0" in error_of(raw)
    raw["groups"][0]["io_budget"] = 1.5
    assert "groups[0](sin).io_budget: Input should be less than or equal to 1" in error_of(raw)


def test_overrides_parse_toml_values_and_find_groups_by_name() -> None:
    raw = base()
    set_dotted(raw, *parse_override("groups.sinc.lr=0.5"))
    set_dotted(raw, *parse_override("experiment.steps=7"))
    set_dotted(raw, *parse_override("policy.preset=seed"))
    assert raw["groups"][1]["lr"] == 0.5 and raw["experiment"]["steps"] == 7
    assert raw["policy"]["preset"] == "seed"
    with pytest.raises(SpecError, match=r"groups\.nope\.lr"):
        set_dotted(raw, "groups.nope.lr", 1)


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        "cluster-recovery",
        "cluster-recovery-cka",
        "cluster-recovery-shared",
        "seed-prototype",
        "threshold-sweep",
        "clustered-digits-rot",
        "clustered-digits-perm",
    ],
)
def test_built_in_examples_are_valid(name: str) -> None:
    spec, runs, text = experiment.plan(name)
    assert runs and spec.experiment.name and "[experiment]" in text


def test_a_results_folder_named_like_an_example_is_not_taken_for_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tiny").mkdir()  # `run tiny --out tiny`, run again from the same place
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert experiment.plan("tiny")[0].experiment.name == "tiny"
    with pytest.raises(SpecError, match="mine: a folder, not a spec file"):
        experiment.plan("mine")
