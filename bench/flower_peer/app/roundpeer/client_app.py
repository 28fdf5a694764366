"""The ClientApp: returns the arrays it received, each value plus (partition-id + 1).

The offset keeps every node's reply distinct (Flower stores objects by content hash, so
replies equal to each other or to the global model could skip part of the upload). With
`check`, each node also saves what it sent, for the test to average.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    server_round = msg.content.config_records["config"]["server-round"]
    assert isinstance(server_round, int)
    received = msg.content.array_records["arrays"]
    offset = np.float32(partition + 1)
    sent: dict[str, Any] = {k: v.numpy() + offset for k, v in received.items()}
    if context.run_config["check"]:
        out = Path(str(context.run_config["out-dir"]))
        np.savez(out / f"client{partition}-round{server_round}.npz", **sent)
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in sent.items()}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(reply, reply_to=msg)
