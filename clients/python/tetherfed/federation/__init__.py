"""`Federation`: a model's link to the coordinator while it trains. The training thread calls
`step()`, which never blocks on the network; an I/O thread publishes, polls and acks.

`_federation` is the training thread's side, `_io` the I/O thread's, `_session` the worker's
registration (used by the I/O thread); decisions and acks pass between the threads only through
`_inbox`, behind its one lock.
"""

from ._federation import Federation, GateCheck, StepReport
from ._io import FederationStats

__all__ = ["Federation", "FederationStats", "GateCheck", "StepReport"]
