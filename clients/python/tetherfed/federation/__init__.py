"""`Federation`: a model's link to the coordinator while it trains. The training thread calls
`step()`, which never blocks on the network; an I/O thread publishes, polls and acks."""

from ._federation import Federation, GateCheck, StepReport

__all__ = ["Federation", "GateCheck", "StepReport"]
