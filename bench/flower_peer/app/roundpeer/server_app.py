"""The ServerApp: stock FedAvg over every SuperNode for `warmup + rounds` rounds, training only.

Each round is timed from FedAvg having built the round's train messages (the instant before the
Grid sends them) to FedAvg having aggregated all N replies. The times go to `out-dir`/result.json
(written last, atomically: the driver waits for it); with `check`, each round's aggregate too.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg, unchanged, with a clock around each round's train step."""

    def __init__(self, nodes: int, check_dir: Path | None) -> None:
        # Every node trains and none evaluates: a round is the train step only.
        super().__init__(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
        self.check_dir = check_dir
        self.sent: dict[int, float] = {}
        self.done: dict[int, float] = {}
        self.replies: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent[server_round] = time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.done[server_round] = time.perf_counter()
        self.replies[server_round] = sum(not m.has_error() for m in replies)
        if self.check_dir is not None and arrays is not None:
            aggregate: dict[str, Any] = {k: v.numpy() for k, v in arrays.items()}
            np.savez(self.check_dir / f"aggregate-round{server_round}.npz", **aggregate)
        return arrays, metrics


def _write(out_dir: Path, result: dict[str, object]) -> None:
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_dir / "result.json")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = Path(str(cfg["out-dir"]))
    nodes, side = int(cfg["nodes"]), int(cfg["side"])
    warmup, rounds = int(cfg["warmup"]), int(cfg["rounds"])
    try:
        rng = np.random.default_rng(0)
        initial = ArrayRecord([rng.random((side, side), dtype=np.float32) for _ in range(4)])
        strategy = TimedFedAvg(nodes, out_dir if cfg["check"] else None)
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=warmup + rounds)
        timed = range(warmup + 1, warmup + rounds + 1)
        _write(
            out_dir,
            {
                "flwr": flwr.__version__,
                "round_s": [strategy.done[r] - strategy.sent[r] for r in timed],
                "warmup_s": [strategy.done[r] - strategy.sent[r] for r in range(1, warmup + 1)],
                "replies": [strategy.replies[r] for r in range(1, warmup + rounds + 1)],
            },
        )
    except BaseException:
        _write(out_dir, {"error": traceback.format_exc()})
        raise
