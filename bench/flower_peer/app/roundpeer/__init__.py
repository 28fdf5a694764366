"""tetherfed's `round` benchmark as a Flower app: a ServerApp running FedAvg, a ClientApp
returning what it received (bench/flower_peer drives it)."""
