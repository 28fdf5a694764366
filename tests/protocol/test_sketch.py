"""Count sketches: the estimator's error as documented, agreement with full scoring, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from tether_protocol.compat import pair_score
from tether_protocol.frame import LayerMismatchError, MetadataError, RangeError, ShapeError
from tether_protocol.messages import LayerSpec, Policy, PolicyPatch, SketchPolicy, SnapshotMeta
from tether_protocol.policy import FederationState, PeerState, decide
from tether_protocol.sketch import (
    LayerSketch,
    decode_sketch_frame,
    encode_sketch_frame,
    noise_sd,
    sketch_layer,
    sketch_row_scores,
    sketch_scores,
)

K = 1024
N = 1 << 16


def correlated_pair(rho: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two U[0,1)-based tethers rescaled into [0, 1] whose pearson is ρ in expectation."""
    x, z = rng.random(N), rng.random(N)
    y = rho * x + math.sqrt(1 - rho**2) * z
    y = (y - y.min()) / (y.max() - y.min())
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("measure", ["pearson", "cosine"])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_estimator_error_is_within_the_documented_bound(measure: str, rho: float) -> None:
    # Prepare: one pair of known correlation, sketched under 150 federation seeds.
    x, y = correlated_pair(rho, np.random.default_rng(int(rho * 10)))
    exact = pair_score(x, y, measure)  # type: ignore[arg-type]
    # Execute
    errors = []
    for seed in range(150):
        spec = SketchPolicy(k=K, seed=seed, min_values=1)
        a, b = sketch_layer(x, spec, "fc"), sketch_layer(y, spec, "fc")
        errors.append(sketch_row_scores(a, {"b": b}, spec, "fc", measure)["b"] - exact)  # type: ignore[arg-type]
    # Assert: sd ≈ (1 − ρ²)/√k ≤ 1/√k, and no bias beyond sampling noise.
    sd, bias = float(np.std(errors)), float(np.mean(errors))
    expected = (1 - exact**2) / math.sqrt(K)
    assert sd <= 1.15 * noise_sd(K), f"sd {sd:.4f} above 1/√k = {noise_sd(K):.4f}"
    assert 0.75 * expected <= sd <= 1.3 * expected, f"sd {sd:.4f}, expected ≈ {expected:.4f}"
    assert abs(bias) < 4 * sd / math.sqrt(len(errors)) + 1e-3, f"bias {bias:.4f}"


def test_dot_on_sketches_is_unbiased() -> None:
    x, y = correlated_pair(0.5, np.random.default_rng(3))
    exact = float(np.dot(x.astype(np.float64), y))
    spec_of = [SketchPolicy(k=K, seed=s, min_values=1) for s in range(100)]
    est = [
        float(np.dot(sketch_layer(x, s, "fc").values, sketch_layer(y, s, "fc").values))
        for s in spec_of
    ]
    sd = np.std(est)
    bound = math.sqrt((np.dot(x, x) * np.dot(y, y) + exact**2) / K)
    assert abs(np.mean(est) - exact) < 4 * sd / 10, "dot estimate biased"
    assert sd < 1.3 * bound, f"dot sd {sd:.1f} above √((‖x‖²‖y‖² + ⟨x,y⟩²)/k) = {bound:.1f}"


def test_same_seed_and_layer_give_comparable_sketches_and_others_do_not() -> None:
    x = np.random.default_rng(0).random(N, dtype=np.float32)
    spec = SketchPolicy(k=K, seed=7, min_values=1)
    same = sketch_layer(x, spec, "fc").values
    assert np.array_equal(same, sketch_layer(x.copy(), spec, "fc").values)
    other_seed = sketch_layer(x, spec.model_copy(update={"seed": 8}), "fc").values
    other_layer = sketch_layer(x, spec, "fc2").values
    assert not np.array_equal(same, other_seed) and not np.array_equal(same, other_layer)


def test_sketch_and_full_scoring_agree_on_decisions_for_well_separated_pairs() -> None:
    # Prepare: a publisher and partners at pearson ≈ 0.9 (merge), 0 (hold) and −0.8 (drift).
    rng = np.random.default_rng(5)
    base = rng.random(N).astype(np.float32)
    partners = {
        "close": 0.9 * base + 0.1 * rng.random(N, dtype=np.float32),
        "unrelated": rng.random(N, dtype=np.float32),
        "opposite": 1 - base + 0.2 * rng.random(N, dtype=np.float32),
    }
    spec = SketchPolicy(k=K, seed=11, min_values=1)
    policy = Policy(trigger="every_publish", pairing="all", sketch=spec)
    full = {w: pair_score(base, t, "pearson") for w, t in partners.items()}
    own = sketch_layer(base, spec, "fc")
    est = sketch_row_scores(
        own, {w: sketch_layer(t, spec, "fc") for w, t in partners.items()}, spec, "fc", "pearson"
    )
    peers = {w: PeerState(w, 1, 1) for w in partners}
    meta = SnapshotMeta(worker_id="me", step=1, epoch=0)

    def decisions(scores: dict[str, float]) -> list[tuple[str, str | None]]:
        state = FederationState(layer_order=["fc"], peers=peers, scores={"fc": scores})
        return sorted((d.action, d.partner_id) for d in decide(policy, state, meta).decisions)

    # Execute / Assert: the same decisions from full and sketched scores, each pair far from
    # the thresholds compared with the estimator's noise.
    assert decisions(est) == decisions(full) == [("drift", "opposite"), ("merge", "close")]
    for w in partners:
        assert abs(est[w] - full[w]) < 4 * noise_sd(K)


def test_all_pairs_on_sketches_match_rows_and_mark_other_shapes_not_comparable() -> None:
    rng = np.random.default_rng(1)
    spec = SketchPolicy(k=256, seed=1, min_values=1)
    sk = {f"w{i}": sketch_layer(rng.random((64, 64)), spec, "fc") for i in range(3)}
    sk["odd"] = sketch_layer(rng.random((32, 128)), spec, "fc")
    matrix = sketch_scores(sk, spec, "fc", "pearson", order=sorted(sk))
    rows = sketch_row_scores(
        sk["w0"], {w: s for w, s in sk.items() if w != "w0"}, spec, "fc", "pearson"
    )
    order = sorted(sk)
    assert np.isnan(matrix[order.index("odd"), order.index("w0")]) and math.isnan(rows["odd"])
    assert matrix[order.index("w0"), order.index("w1")] == pytest.approx(rows["w1"], abs=1e-6)


def test_a_policy_with_thresholds_inside_the_noise_is_refused_unless_forced() -> None:
    band = 3 / math.sqrt(K)
    with pytest.raises(ValidationError, match="noise band"):
        Policy(merge_threshold=band / 2, sketch=SketchPolicy(k=K))
    with pytest.raises(ValidationError, match="drift_threshold"):
        Policy(merge_threshold=0.5, drift_threshold=-band / 2, sketch=SketchPolicy(k=K))
    assert Policy(merge_threshold=band / 2, sketch=SketchPolicy(k=K, force=True)).sketch
    assert Policy(merge_threshold=2 * band, drift_threshold=-2 * band, sketch=SketchPolicy(k=K))
    assert Policy(
        measure="dot", merge_threshold=0.0, drift_threshold=None, sketch=SketchPolicy(k=K)
    )
    # A larger sketch narrows the band: the same threshold passes with k = 16,384.
    assert Policy(merge_threshold=band / 2, sketch=SketchPolicy(k=16_384))
    # Turning sketches on by PATCH revalidates the whole policy.
    loose = Policy(merge_threshold=0.01, drift_threshold=None)
    with pytest.raises(ValidationError, match="noise band"):
        PolicyPatch(sketch=SketchPolicy(k=K)).apply(loose)


def test_sketch_frame_round_trip_and_validation() -> None:
    rng = np.random.default_rng(2)
    spec = SketchPolicy(k=128, seed=3, min_values=1000)
    big, small = rng.random((64, 64), dtype=np.float32), rng.random((4, 8), dtype=np.float32)
    table = [LayerSpec(name="big", shape=[64, 64]), LayerSpec(name="small", shape=[4, 8])]
    meta = SnapshotMeta(worker_id="w", step=3, epoch=0)
    frame = encode_sketch_frame({"big": big, "small": small}, meta, spec)
    assert len(frame) < big.nbytes / 4
    decoded, layers = decode_sketch_frame(frame, table, spec)
    assert decoded.meta is not None and decoded.meta.step == 3
    assert isinstance(layers["big"], LayerSketch) and layers["big"].shape == (64, 64)
    assert np.array_equal(layers["big"].values, sketch_layer(big, spec, "big").values)
    assert np.array_equal(layers["small"], small)
    # Buckets are unbounded sums; a layer travelling whole is still a tether in [0, 1].
    assert float(np.abs(layers["big"].values).max()) > 1.0
    with pytest.raises(RangeError, match="small"):
        decode_sketch_frame(
            encode_sketch_frame({"big": big, "small": small + 1}, meta, spec), table, spec
        )
    with pytest.raises(MetadataError, match="seed"):
        decode_sketch_frame(frame, table, spec.model_copy(update={"seed": 4}))
    with pytest.raises(LayerMismatchError):
        decode_sketch_frame(frame, table[:1], spec)
    with pytest.raises(ShapeError, match="sketch"):
        decode_sketch_frame(
            frame,
            [table[0], LayerSpec(name="small", shape=[32])],
            spec.model_copy(update={"min_values": 32}),
        )


def test_a_sketch_frame_hashed_another_way_is_refused_naming_why() -> None:
    from tether_protocol.frame import encode_frame
    from tether_protocol.sketch import SKETCH_KEY

    spec = SketchPolicy(k=16, min_values=64)
    meta = SnapshotMeta(worker_id="w", step=1, epoch=0)
    sk = sketch_layer(np.ones(64, dtype=np.float32), spec, "big")
    layout = {"k": 16, "seed": 0, "layers": {"big": {"shape": [64], "sum": 64.0}}}
    for how in ({}, {"hash": "numpy-default-rng"}):  # an older tetherfed's frames had no "hash"
        extra = {SKETCH_KEY: json.dumps(layout | how)}
        frame = encode_frame({"big": sk.values}, meta, extra_metadata=extra)
        with pytest.raises(MetadataError, match="compare with nothing here"):
            decode_sketch_frame(frame, None, None)


def test_sketching_keeps_no_per_value_table_and_chunks_do_not_change_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tracemalloc

    from tether_protocol import sketch

    spec = SketchPolicy(k=1024)
    x = np.random.default_rng(5).random(1 << 22, dtype=np.float32)  # 4 M values, 16 MiB
    sketch._ones.cache_clear()
    tracemalloc.start()
    whole = sketch_layer(x, spec, "conv")
    sketch_rows_ = sketch.sketch_rows({"a": whole}, spec, "conv", "pearson")
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A kept hash table would hold 12 bytes a value (48 MiB here); the chunks need about
    # 3 × 8 bytes × CHUNK while they work, and nothing of size n stays.
    assert held < 1 << 20, f"{held} bytes kept after sketching"
    assert peak < 40 * sketch.CHUNK, f"peak {peak} bytes while sketching"
    assert sketch_rows_["a"].shape == (1024,)
    monkeypatch.setattr(sketch, "CHUNK", 1000)  # odd chunk boundaries: the same buckets
    again = sketch_layer(x, spec, "conv")
    np.testing.assert_allclose(again.values, whole.values, rtol=1e-5, atol=1e-3)
    assert again.total == whole.total
