"""Data per worker: WorkerInfo from the plan to the task, task args, shards, the clustered digits
tasks, task metrics, and the merge gate's held-out batch."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tetherfed import WorkerInfo
from tetherfed.launch._launch import plan_workers, worker_argv
from tetherfed.tethers import accuracy
from tetherfed.worker._main import add_worker_parser_args, config_from_args
from tetherfed.worker._options import ShardSpec, WorkerOptions, parse_options
from tetherfed.worker._tasks import (
    label_permutations,
    load_task,
    rotate,
    shard,
)
from tetherfed.worker._worker import WorkerConfig, _setup, evaluate_metrics

RESERVE = 256  # the gate reserve of a training set of at least 1,024 examples


@pytest.fixture(autouse=True)
def user_module_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def rows(data: TensorDataset) -> set[tuple[float, ...]]:
    return {tuple(x.flatten().tolist()) for x in data.tensors[0]}


def group_of(size: int, seed: int = 7, group_index: int = 0) -> list[WorkerInfo]:
    return [
        WorkerInfo(index=k, group_index=group_index, index_in_group=k, group_size=size, seed=seed)
        for k in range(size)
    ]


# -- WorkerInfo: plan → argv → config → task -----------------------------------------------------


def test_plan_and_argv_give_each_worker_its_place_and_the_task_receives_it(tmp_path: Path) -> None:
    options = WorkerOptions(task="usertask_example:worker_task", task_args={"scale": 2.5})
    plans = plan_workers([("a", 2, options), ("b", 3, options)], seed=40, init="shared", devices=0)
    parser = argparse.ArgumentParser()
    add_worker_parser_args(parser)

    configs = [
        config_from_args(
            parser.parse_args(
                worker_argv(p, "http://x", "f", tmp_path, 5, run_seed=40, repeat=3)[1:]
            )
        )
        for p in plans
    ]

    assert [c.info for c in configs] == [
        WorkerInfo(index=0, group="a", group_index=0, index_in_group=0, group_size=2, repeat=3, seed=40),
        WorkerInfo(index=1, group="a", group_index=0, index_in_group=1, group_size=2, repeat=3, seed=40),
        WorkerInfo(index=2, group="b", group_index=1, index_in_group=0, group_size=3, repeat=3, seed=40),
        WorkerInfo(index=3, group="b", group_index=1, index_in_group=1, group_size=3, repeat=3, seed=40),
        WorkerInfo(index=4, group="b", group_index=1, index_in_group=2, group_size=3, repeat=3, seed=40),
    ]  # fmt: skip
    cfg = configs[3]
    task = load_task(cfg.task, seed=cfg.resolved_data_seed, worker=cfg.info, args=cfg.task_args)
    assert task.train.tensors[0][0].tolist() == [43.0, 3, 1, 1, 3, 3, 40, 2.5]


def test_a_lone_worker_is_worker_zero_of_a_group_of_one_seeded_by_its_seed() -> None:
    parser = argparse.ArgumentParser()
    add_worker_parser_args(parser)
    cfg = config_from_args(parser.parse_args(["--seed", "5", "--group", "g"]))
    assert cfg.info == WorkerInfo(group="g", seed=5)
    with pytest.raises(ValueError, match="outside a group of 2"):
        WorkerInfo(index_in_group=2, group_size=2)


def test_task_args_round_trip_the_command_line_and_unknown_ones_are_refused() -> None:
    options = WorkerOptions(task="digits-rot", task_args={"k": 6, "cluster": 2})
    again = parse_options(["--task", "digits-rot", "--task-arg", "k=6", "--task-arg", "cluster=2"])
    assert again == options
    with pytest.raises(ValueError, match=r"takes no argument 'kk'.*k, cluster"):
        load_task("digits-rot", args={"kk": 2})
    with pytest.raises(ValueError, match="cannot set"):
        WorkerOptions(task_args={"seed": 1})


# -- shards --------------------------------------------------------------------------------------


def test_disjoint_shards_split_one_permutation_and_leave_validation_and_reserve_alone() -> None:
    base = load_task("random-classification", seed=7)
    parts = [shard(base, ShardSpec(size=30), w, data_seed=100 + w.index) for w in group_of(4)]

    shards = [rows(task.train) for task, _ in parts]
    assert all(
        len(s) == 30 and len(task.train) == 30 for s, (task, _) in zip(shards, parts, strict=True)
    )
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    reserves = {frozenset(rows(held)) for _, held in parts}
    assert len(reserves) == 1  # one reserve for the whole group
    (reserve,) = reserves
    assert len(reserve) == RESERVE and not reserve & set().union(*shards)
    assert all(torch.equal(task.val.tensors[0], base.val.tensors[0]) for task, _ in parts)
    assert set().union(*shards) | reserve <= rows(base.train)
    again, _ = shard(base, ShardSpec(size=30), group_of(4)[2], data_seed=0)  # not the data seed
    assert rows(again.train) == shards[2]
    other, _ = shard(base, ShardSpec(size=30), group_of(4, group_index=1)[2], data_seed=0)
    assert rows(other.train) != shards[2]  # another group, another permutation


def test_iid_shards_are_seeded_by_the_data_seed_and_avoid_the_reserve() -> None:
    base = load_task("random-classification", seed=7)
    worker = group_of(2)[0]
    a, held = shard(base, ShardSpec(size=500, scheme="iid"), worker, data_seed=1)
    b, _ = shard(base, ShardSpec(size=500, scheme="iid"), worker, data_seed=2)
    a_again, _ = shard(base, ShardSpec(size=500, scheme="iid"), worker, data_seed=1)
    assert len(rows(a.train)) == 500 and rows(a.train) == rows(a_again.train)
    assert rows(a.train) != rows(b.train) and rows(a.train) & rows(b.train)  # they may overlap
    assert not rows(a.train) & rows(held)


def test_shards_that_do_not_fit_the_training_set_are_refused() -> None:
    base = load_task("digits", seed=0)  # 1,438 training examples, 256 held out
    with pytest.raises(ValueError, match=r"4 disjoint shards of 400 need 1600 .* size ≤ 295"):
        shard(base, ShardSpec(size=400), group_of(4)[0], data_seed=0)
    with pytest.raises(ValueError, match="an iid shard of 2000"):
        shard(base, ShardSpec(size=2000, scheme="iid"), group_of(1)[0], data_seed=0)
    with pytest.raises(ValueError):
        ShardSpec(size=0)
    with pytest.raises(ValueError):
        ShardSpec.model_validate({"size": 3, "scheme": "random"})
    assert parse_options(["--shard", "size=5,scheme=iid"]).shard == ShardSpec(size=5, scheme="iid")


def test_a_sharded_workers_gate_batch_is_the_held_out_reserve_not_its_shard(
    tmp_path: Path,
) -> None:
    cfg = WorkerConfig(
        task="digits",
        shard=ShardSpec(size=40),
        steps=1,
        group_size=3,
        index_in_group=1,
        run_seed=11,
        data_seed=3,
    )
    run = _setup(cfg)
    try:
        assert run.probe is not None
        own = {tuple(x.flatten().tolist()) for x in run.probe.own[0]}
        assert len(run.task.train) == 40 and len(own) == RESERVE
        assert not own & rows(run.task.train)
        whole = load_task("digits", seed=11)  # the group's dataset comes from the run seed
        assert own <= rows(whole.train) and not own & rows(whole.val)
        unsharded = _setup(WorkerConfig(task="digits", steps=1, data_seed=3))
        assert unsharded.probe is not None
        assert {tuple(x.flatten().tolist()) for x in unsharded.probe.own[0]} <= rows(
            unsharded.task.train
        )  # no shard: the gate judges on the worker's own training examples, as before
    finally:
        run.metrics.close()


# -- clustered tasks -----------------------------------------------------------------------------


def test_digits_rot_rotates_training_and_validation_by_the_workers_cluster() -> None:
    tasks = [load_task("digits-rot", seed=3, worker=WorkerInfo(group_index=g)) for g in range(4)]
    plain = load_task("digits", seed=3)
    for g, task in enumerate(tasks):
        for split in ("train", "val"):
            ours, theirs = getattr(task, split).tensors, getattr(plain, split).tensors
            assert torch.equal(ours[0], torch.rot90(theirs[0], g, dims=(2, 3)))
            assert torch.equal(ours[1], theirs[1])
    assert not torch.equal(tasks[1].train.tensors[0], tasks[0].train.tensors[0])
    # every cluster draws the same probe inputs (from all four rotations)
    probes = [t.sample_inputs(16, torch.Generator().manual_seed(0)) for t in tasks]  # type: ignore[misc]
    assert all(torch.equal(p, probes[0]) for p in probes)


def test_digits_rot_beyond_four_clusters_turns_by_360_over_k_and_checks_the_cluster() -> None:
    explicit = load_task("digits-rot", seed=3, args={"k": 6, "cluster": 1})
    plain = load_task("digits", seed=3)
    assert torch.allclose(explicit.val.tensors[0], rotate(plain.val.tensors[0], 60.0))
    sixty, twice = rotate(plain.val.tensors[0], 60.0), rotate(plain.val.tensors[0], 120.0)
    assert not torch.allclose(sixty, twice)
    with pytest.raises(ValueError, match="not a cluster of k=2"):
        load_task("digits-rot", seed=3, worker=WorkerInfo(group="c", group_index=2), args={"k": 2})
    with pytest.raises(ValueError, match="k must be an integer"):
        load_task("digits-rot", args={"k": 0})


def test_digits_perm_maps_labels_through_distinct_fixed_permutations() -> None:
    perms = label_permutations(4)
    assert torch.equal(perms[0], torch.arange(10))
    assert len({tuple(p.tolist()) for p in perms}) == 4
    assert all(sorted(p.tolist()) == list(range(10)) for p in perms)
    assert all(torch.equal(a, b) for a, b in zip(perms, label_permutations(4), strict=True))
    plain = load_task("digits", seed=2)
    for g in range(4):
        task = load_task("digits-perm", seed=2, worker=WorkerInfo(group_index=g))
        for split in ("train", "val"):
            ours, theirs = getattr(task, split).tensors, getattr(plain, split).tensors
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], perms[g][theirs[1]])
    moved = load_task("digits-perm", seed=2, args={"cluster": 1})
    assert (moved.train.tensors[1] != plain.train.tensors[1]).any()


# -- metrics -------------------------------------------------------------------------------------


def test_accuracy_counts_argmax_hits_and_classification_tasks_declare_it() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5
    for name in ("random-classification", "digits", "digits-rot", "digits-perm"):
        assert set(load_task(name).metrics) == {"acc"}, name
    assert dict(load_task("sin").metrics) == {}


def test_evaluation_reports_val_loss_and_every_task_metric() -> None:
    cfg_task = load_task("digits-perm", seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    found = evaluate_metrics(model, cfg_task, torch.device("cpu"))
    x, y = cfg_task.val.tensors
    with torch.no_grad():
        expected = accuracy(model(x), y)
    assert set(found) == {"val_loss", "val_acc"} and found["val_acc"] == expected
