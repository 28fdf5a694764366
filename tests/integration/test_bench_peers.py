"""The `round` row's peer, Flower, really runs: a FedAvg round on Flower's deployment runtime
(a SuperLink and SuperNodes as processes on loopback) aggregates what the clients sent.

Needs Flower in its own environment (`make bench-peers` → .venv-peers); skipped without it.
Tiny sizes (2 SuperNodes, 4 arrays of 8 × 8): this checks the peer's arithmetic and its
processes, not its speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest

from bench import flower_peer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not flower_peer.available(),
        reason=f"Flower is not installed at {flower_peer.venv()} (`make bench-peers`)",
    ),
]


@pytest.mark.timeout(480)
def test_flower_fedavg_aggregates_the_mean_of_what_the_clients_sent(tmp_path: Path) -> None:
    nodes, warmup, rounds = 2, 1, 2
    result = flower_peer.run(
        nodes, side=8, rounds=rounds, warmup=warmup, check_dir=tmp_path, timeout_s=420
    )
    assert result["flwr"] == flower_peer.FLWR_PIN
    assert len(result["round_s"]) == rounds and all(t > 0 for t in result["round_s"])
    assert result["replies"] == [nodes] * (warmup + rounds)

    aggregates: dict[int, dict[str, np.ndarray]] = {}
    for r in range(1, warmup + rounds + 1):
        aggregate = np.load(tmp_path / f"aggregate-round{r}.npz")
        sent = [np.load(tmp_path / f"client{i}-round{r}.npz") for i in range(nodes)]
        assert sorted(aggregate.files) == sorted(sent[0].files) and len(aggregate.files) == 4
        for key in aggregate.files:
            mean = np.mean([s[key] for s in sent], axis=0, dtype=np.float64)
            assert aggregate[key].dtype == np.float32 and aggregate[key].shape == (8, 8)
            np.testing.assert_allclose(aggregate[key], mean, rtol=1e-6)
            if r > 1:  # each client received the previous aggregate (and added partition + 1)
                for i, s in enumerate(sent):
                    np.testing.assert_allclose(s[key], aggregates[r - 1][key] + i + 1, rtol=1e-6)
        aggregates[r] = {k: aggregate[k] for k in aggregate.files}

    # The SuperLink, the SuperNodes, `flwr run` and all they started have ended.
    assert len(result["pids"]) >= nodes + 2
    left = [cmd for pid in result["pids"] if (cmd := _running(pid))]
    assert not left, left


def _running(pid: int) -> list[str]:
    """The command line of a live process `pid` (empty when gone or a zombie)."""
    try:
        proc = psutil.Process(pid)
        return [] if proc.status() == psutil.STATUS_ZOMBIE else proc.cmdline()
    except psutil.Error:
        return []
