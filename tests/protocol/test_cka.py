"""Linear CKA (Kornblith et al. 2019) directly and through the probe-Gram scoring path."""

from __future__ import annotations

import numpy as np
import pytest

from tether_protocol.compat import (
    all_pairs,
    centre_gram,
    gram_scores,
    linear_cka,
    probe_gram,
    row_scores,
)
from tether_protocol.frame import (
    LayerMismatchError,
    ShapeError,
    decode_frame,
    encode_frame,
    probe_gram_name,
    split_probe_grams,
)
from tether_protocol.messages import LayerSpec, SnapshotMeta


def activations(seed: int, n: int = 256, p: int = 8) -> np.ndarray:
    """A ReLU layer's outputs on n inputs: structure shared with every seed through the inputs."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, p))


def test_cka_against_a_permuted_copy_is_one() -> None:
    x = np.maximum(activations(0) @ np.random.default_rng(1).normal(size=(8, 16)), 0)
    permuted = x[:, np.random.default_rng(2).permutation(16)]
    assert linear_cka(x, permuted) == pytest.approx(1.0, abs=1e-12)
    grams = np.stack([probe_gram(x).reshape(-1), probe_gram(permuted).reshape(-1)])
    assert gram_scores(grams, "cka")[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_cka_against_an_unrelated_layer_is_near_zero() -> None:
    x, y = activations(0, n=1024, p=4), activations(99, n=1024, p=4)
    direct = linear_cka(x, y)
    assert 0.0 <= direct < 0.02, f"independent features should score ≈ 0, got {direct}"
    matrix = all_pairs({"a": probe_gram(x), "b": probe_gram(y)}, "cka").matrix
    assert matrix[0, 1] == pytest.approx(direct, abs=1e-5)


def test_cka_through_the_gram_path_equals_cka_computed_directly() -> None:
    rng = np.random.default_rng(5)
    inputs = rng.normal(size=(64, 3))
    layers = [np.tanh(inputs @ rng.normal(size=(3, w))) for w in (4, 8, 8, 32)]
    # Different widths: CKA needs only the same probe inputs, and so does the Gram path.
    grams = {f"w{i}": probe_gram(a) for i, a in enumerate(layers)}
    matrix = all_pairs(grams, "cka", order=list(grams)).matrix
    row = row_scores(grams["w0"], {k: v for k, v in grams.items() if k != "w0"}, "cka")
    for i in range(len(layers)):
        for j in range(len(layers)):
            assert matrix[i, j] == pytest.approx(linear_cka(layers[i], layers[j]), abs=1e-5)
    for j in range(1, len(layers)):
        assert row[f"w{j}"] == pytest.approx(linear_cka(layers[0], layers[j]), abs=1e-5)


def test_cka_is_invariant_to_scale_and_the_sent_gram_need_not_be_centred() -> None:
    x = activations(3, n=32)
    raw_gram = x @ x.T  # uncentred, unscaled: the coordinator centres it
    centred = centre_gram(raw_gram)
    assert np.allclose(centred.sum(axis=0), 0) and np.allclose(centred.sum(axis=1), 0)
    assert np.allclose(centre_gram(centred), centred)
    cos = gram_scores(np.stack([centred.reshape(-1), probe_gram(5.0 * x).reshape(-1)]), "cka")
    assert cos[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_a_constant_layer_is_not_comparable() -> None:
    assert np.isnan(linear_cka(np.ones((16, 3)), activations(0, n=16)))
    matrix = all_pairs(
        {"a": probe_gram(np.ones((16, 3))), "b": probe_gram(activations(0, 16))}, "cka"
    )
    assert np.isnan(matrix.matrix[0, 1])


def test_frames_carry_probe_grams_beside_the_registered_layers() -> None:
    layers = [LayerSpec(name="fc1", shape=[4, 2]), LayerSpec(name="out", shape=[1, 4])]
    meta = SnapshotMeta(worker_id="w", step=1, epoch=0)
    tethers = {"fc1": np.full((4, 2), 0.5), "out": np.full((1, 4), 0.5)}
    gram = probe_gram(activations(0, n=8))
    frame = decode_frame(
        encode_frame({**tethers, probe_gram_name("fc1"): gram}, meta), layers=layers
    )
    own, grams = split_probe_grams(frame.entries)
    assert list(own) == ["fc1", "out"] and list(grams) == ["fc1"]
    assert np.array_equal(frame.tensors[probe_gram_name("fc1")], gram)
    with pytest.raises(LayerMismatchError, match="not registered"):
        decode_frame(encode_frame({**tethers, probe_gram_name("fc9"): gram}, meta), layers=layers)
    with pytest.raises(ShapeError, match=r"expected \[n, n\]"):
        decode_frame(
            encode_frame({**tethers, probe_gram_name("out"): np.ones((8, 4))}, meta), layers=layers
        )
    both = {**tethers, probe_gram_name("fc1"): gram, probe_gram_name("out"): np.eye(4)}
    with pytest.raises(ShapeError, match="one size n"):
        decode_frame(encode_frame(both, meta), layers=layers)
