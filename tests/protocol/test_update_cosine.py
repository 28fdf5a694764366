"""`update_cosine`: the cosine of tether updates since each worker's origin (clustered FL,
Sattler, Müller & Samek 2019) separates clusters that differ by a relabelling of outputs, which
linear CKA, invariant to permutations of units, scores alike."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest

from tether_protocol.compat import (
    MEASURES,
    all_pairs,
    gram_scores,
    linear_cka,
    pair_score,
    probe_gram,
    row_scores,
    tether_update,
)
from tether_protocol.messages import Policy, SketchPolicy, policy_preset
from tether_protocol.sketch import sketch_layer, sketch_scores

OUT, IN, PROBE = 10, 16, 64


def _federation(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(shared init W0, worker → trained weights, probe inputs): cluster A (a0..a2) learned ΔA
    plus its own noise, cluster B (b0..b2) P·ΔA (output rows permuted: the same task with its
    labels relabelled) plus its own noise. The init is small beside the update, as for a
    trained model, so B's models are A's up to the permutation of outputs."""
    rng = np.random.default_rng(seed)
    w0 = 0.01 * rng.normal(size=(OUT, IN))
    delta = rng.normal(size=(OUT, IN))
    perm = np.roll(np.arange(OUT), 1)  # a derangement: every label moves
    models = {}
    for i in range(3):
        models[f"a{i}"] = w0 + delta + 0.05 * rng.normal(size=(OUT, IN))
        models[f"b{i}"] = w0 + delta[perm] + 0.05 * rng.normal(size=(OUT, IN))
    return w0, models, rng.normal(size=(PROBE, IN))


def _within_across(matrix: np.ndarray, names: list[str]) -> tuple[float, float]:
    within, across = [], []
    for i, a in enumerate(names):
        for j, b in enumerate(names[i + 1 :], i + 1):
            (within if a[0] == b[0] else across).append(matrix[i, j])
    return float(np.mean(within)), float(np.mean(across))


def test_update_cosine_separates_relabelled_clusters_that_cka_scores_alike() -> None:
    w0, models, probe = _federation()
    names = sorted(models)

    # cka as the coordinator scores it: cosine of the workers' published probe Grams
    grams = np.stack([probe_gram(probe @ models[w].T).reshape(-1) for w in names])
    cka = gram_scores(grams, "cka")
    updates = {w: tether_update(models[w], w0) for w in names}
    upd = all_pairs(updates, "update_cosine", order=names).matrix

    cka_in, cka_across = _within_across(cka, names)
    upd_in, upd_across = _within_across(upd, names)
    assert abs(cka_in - cka_across) < 0.01, (cka_in, cka_across)
    assert cka_across > 0.99  # cka cannot tell the clusters apart
    assert upd_in > 0.99 and upd_across < 0.2, (upd_in, upd_across)
    assert upd_in - upd_across > 0.8
    # the probe-Gram path is linear CKA of the outputs (Kornblith et al. 2019, eq. 5)
    assert cka[0, 3] == pytest.approx(
        linear_cka(probe @ models[names[0]].T, probe @ models[names[3]].T), abs=1e-5
    )


def test_one_row_agrees_with_the_matrix_and_a_pair() -> None:
    w0, models, _ = _federation(1)
    names = sorted(models)
    updates = {w: tether_update(models[w], w0) for w in names}
    full = all_pairs(updates, "update_cosine", order=names)
    row = row_scores(updates["a0"], {w: updates[w] for w in names[1:]}, "update_cosine")
    for w in names[1:]:
        assert row[w] == pytest.approx(full.score("a0", w), abs=1e-6)
        assert pair_score(updates["a0"], updates[w], "update_cosine") == pytest.approx(
            row[w], abs=1e-6
        )
    expected = np.dot(updates["a0"].ravel(), updates["b1"].ravel()) / (
        np.linalg.norm(updates["a0"]) * np.linalg.norm(updates["b1"])
    )
    assert row["b1"] == pytest.approx(expected, abs=1e-5)


def test_a_zero_update_is_not_comparable() -> None:
    w0, models, _ = _federation(2)
    first = tether_update(w0, w0)  # a first publish: the tether is its own origin
    assert not first.any() and first.dtype == np.float32
    moved = tether_update(models["a0"], w0)
    row = row_scores(first, {"other": moved}, "update_cosine")
    assert math.isnan(row["other"])
    m = all_pairs({"first": first, "moved": moved, "also": 2 * moved}, "update_cosine").matrix
    assert np.isnan(m[0, 1]) and np.isnan(m[1, 0]) and np.isnan(m[0, 2])
    assert m[1, 2] == pytest.approx(1.0)


def test_an_update_needs_the_origin_of_its_shape() -> None:
    with pytest.raises(ValueError, match="origin"):
        tether_update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_sketched_updates_estimate_the_update_cosine() -> None:
    """A count sketch is linear: S(T) − S(T⁰) = S(T − T⁰), so scoring the difference of the
    sketches a worker publishes and of its origin estimates the update cosine (sd ≤ 1/√k)."""
    rng = np.random.default_rng(3)
    spec = SketchPolicy(min_values=1, k=4096, seed=5)
    origin = rng.random((64, 256), dtype=np.float32)
    shared = rng.normal(size=origin.shape)
    tethers = {
        "a": origin + 0.01 * (shared + 0.5 * rng.normal(size=origin.shape)),
        "b": origin + 0.01 * (shared + 0.5 * rng.normal(size=origin.shape)),
        "c": origin + 0.01 * rng.normal(size=origin.shape),
    }
    then = sketch_layer(origin, spec, "fc")
    diffs = {}
    for w, t in tethers.items():
        now = sketch_layer(t.astype(np.float32), spec, "fc")
        direct = sketch_layer(tether_update(t, origin), spec, "fc")
        np.testing.assert_allclose(now.values - then.values, direct.values, atol=1e-4)
        diffs[w] = direct
    estimate = sketch_scores(diffs, spec, "fc", "update_cosine", order=["a", "b", "c"])
    exact = all_pairs(
        {w: tether_update(t, origin) for w, t in tethers.items()},
        "update_cosine",
        order=["a", "b", "c"],
    ).matrix
    np.testing.assert_allclose(estimate, exact, atol=3 / math.sqrt(spec.k))


def test_policy_accepts_update_cosine_with_cosine_thresholds() -> None:
    assert "update_cosine" in MEASURES
    Policy(measure="update_cosine", merge_threshold=0.8, drift_threshold=-1.0)
    with pytest.raises(pydantic.ValidationError, match=r"outside \[-1, 1\]"):
        Policy(measure="update_cosine", merge_threshold=1.5)
    # sketched: the noise band of a cosine estimate applies
    with pytest.raises(pydantic.ValidationError, match="noise band"):
        Policy(measure="update_cosine", merge_threshold=0.05, sketch=SketchPolicy(k=1024))


def test_the_clustered_preset() -> None:
    policy = policy_preset("clustered")
    assert policy.measure == "update_cosine" and policy.layers == "all"
    assert policy.relative == "rank" and policy.pairing == "best"
    assert policy.gate is not None and policy.warmup_steps > 0
