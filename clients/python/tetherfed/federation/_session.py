"""The session: who this worker is to the coordinator, and how it becomes and stays that.

It registers (or resumes a checkpointed identity and claims it with a heartbeat), notices when
the coordinator forgot the worker (restarted without its state, federation created anew) and
registers again, and records a permanent refusal. Only the I/O thread calls its methods; the
training thread reads its immutable values (`identity`, `policy`, `hold`, `refusal`), each
replaced by one reference assignment.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from tether_protocol.messages import Heartbeat, Hold, LayerSpec, Policy, WireDType, WorkerCreate
from tetherfed.client._errors import (
    APIError,
    AuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RefusedError,
)
from tetherfed.client._sdk import Client
from tetherfed.tethers._tethering import TetherParametrization

from ._holds import HoldTally
from ._inbox import Inbox

log = logging.getLogger("tetherfed.federation")


@dataclass(frozen=True)
class Identity:
    """The worker's registration: its id and token, and the federation incarnation it joined
    (a federation created anew has another); all None before registering."""

    worker_id: str | None = None
    token: str | None = None
    incarnation: str | None = None


@dataclass(frozen=True)
class Progress:
    """The training thread's latest step, as heartbeats report it."""

    step: int = 0
    epoch: int = 0
    loss: float | None = None
    grad_norm: float | None = None


class Session:
    """This worker's registration with one federation (used by the I/O thread only)."""

    def __init__(
        self,
        client: Client,
        federation: str,
        name: str,
        specs: list[LayerSpec],
        meta: Mapping[str, Any],
        *,
        inbox: Inbox,
        admin_token: str | None,
        claim_wait_s: float,
    ) -> None:
        self.client, self.federation, self.name = client, federation, name
        self._specs, self._meta = specs, dict(meta)
        self._inbox = inbox  # reset when the coordinator forgets this worker
        self._admin_token, self.claim_wait_s = admin_token, claim_wait_s
        # The session id names this process: a second one under the same worker id gets a 409.
        self._session, self._contested = secrets.token_hex(8), 0.0
        self._ever_registered = False
        self.registered = threading.Event()
        self.identity = Identity()
        self.policy: Policy | None = None
        self.refusal: RefusedError | None = None  # set when the coordinator refused for good
        # Why the latest scoring round gave this worker nothing to apply (logged once per reason).
        self.hold: Hold | None = None
        self._hold_said = ""
        self.holds = HoldTally()  # rounds held, by code; warns of a streak the user can fix

    @property
    def worker_id(self) -> str | None:
        """The worker id (None until registered, and after the coordinator forgot it)."""
        return self.identity.worker_id

    @property
    def meta(self) -> Mapping[str, Any]:
        """The meta this worker registers with (`init_digest` among it; read-only)."""
        return MappingProxyType(self._meta)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take the identity a checkpoint kept (before the I/O thread starts)."""
        self.identity = Identity(
            state.get("worker_id"), state.get("token"), state.get("incarnation")
        )

    # -- registering ----------------------------------------------------------------------------
    def register(self, progress: Progress) -> None:
        """Register (or resume); a refusal of a first registration is permanent (`refuse`)."""
        first = not self._ever_registered and self.worker_id is None
        try:
            if self.worker_id is not None and self.identity.token is not None:
                self._resume(progress)
            else:
                self._register_new()
        except (NotFoundError, AuthError, BadRequestError) as error:
            if first:
                self.refuse(error)
            raise
        self._ever_registered = True
        self.registered.set()

    def _resume(self, progress: Progress) -> None:
        assert self.worker_id is not None
        self.client.authorize(self.identity.token)
        try:
            federation = self.client.get_federation(self.federation)
            if self.identity.incarnation not in (None, federation.incarnation):
                # Created anew since the checkpoint: its worker ids are not ours, even one
                # that happens to resolve.
                self.forget(self._anew(federation.incarnation))
                self._register_new()
                return
            worker = self.client.get_worker(self.federation, self.worker_id)
        except (NotFoundError, AuthError) as error:  # the coordinator lost this worker
            self.forget(f"worker {self.worker_id} is unknown to the coordinator ({error.detail})")
            raise
        self.policy = federation.policy
        self.identity = replace(self.identity, incarnation=federation.incarnation)
        if worker.status == "left":
            worker = self.client.rejoin(self.federation, worker.worker_id)
        self._claim(progress)
        log.info("resumed as worker %s (status %s)", worker.worker_id, worker.status)

    def _claim(self, progress: Progress) -> None:
        """Claim the identity with a heartbeat before publishing anything under it."""
        try:
            self.heartbeat(progress)
        except ConflictError as error:  # another process runs as this worker: never both
            # A crashed predecessor's session lapses within the heartbeat TTL: wait that long
            # (retrying), then give up for good.
            self._contested = self._contested or time.monotonic()
            if time.monotonic() - self._contested > self.claim_wait_s:
                self.refuse(error)
            raise

    def _register_new(self) -> None:
        self.client.authorize(self._admin_token)  # registering is the admin token's call
        reg = self.client.register_worker(self.federation, self.name, self._specs, self._meta)
        self.policy = reg.policy
        self.identity = Identity(reg.worker_id, reg.token, reg.incarnation)
        self.client.incarnation = None
        self.client.authorize(reg.token)
        log.info("registered as worker %s in federation %s", reg.worker_id, self.federation)

    def heartbeat(self, progress: Progress, ending: bool = False) -> None:
        """Tell the coordinator this process is alive (and where training is)."""
        assert self.worker_id is not None
        beat = Heartbeat(
            step=progress.step,
            epoch=progress.epoch,
            loss=progress.loss,
            grad_norm=progress.grad_norm,
            session=self._session,
            ending=ending,
        )
        self.client.heartbeat(self.federation, self.worker_id, beat)

    # -- losing the registration ----------------------------------------------------------------
    def refuse(self, error: APIError) -> None:
        """A permanent refusal (unknown federation, token refused, invalid layer table): the I/O
        thread stops, the next `step()` raises `RefusedError`."""
        self.refusal = RefusedError(
            f"the coordinator refused worker {self.name!r} in federation {self.federation!r}: "
            f"{error.detail} (HTTP {error.status})"
        )
        log.error("%s", self.refusal)

    def publish_refused(self, error: APIError) -> None:
        """The coordinator refused a publish for good; if the worker is gone from the
        federation, come back: under the same id when it left, a new one when it is unknown."""
        if isinstance(error, ConflictError):
            self.registered.clear()
        elif isinstance(error, NotFoundError | AuthError):
            self.forget(f"worker {self.worker_id} is unknown to the coordinator ({error.detail})")

    def forget(self, why: str) -> None:
        """The coordinator lost this worker (restarted without its state, federation re-created):
        register again under a new id, with the inbox reset (decision ids of the new incarnation
        start over, acks of decisions the coordinator no longer has are moot)."""
        log.warning("%s: registering again under a new id", why)
        self.identity, self.client.incarnation, self.hold = Identity(), None, None
        self._inbox.reset()
        self.registered.clear()

    def check_incarnation(self) -> None:
        """Forget this worker's registration when a worker-facing answer names another
        incarnation of the federation than the one it joined (deleted and created again, or
        lost by Redis and created again), even if its worker id happens to resolve there."""
        seen = self.client.incarnation
        if seen is None or seen == self.identity.incarnation:
            return
        if self.identity.incarnation is None:  # joined before incarnations were reported
            self.identity = replace(self.identity, incarnation=seen)
            return
        self.forget(self._anew(seen))

    def _anew(self, seen: str) -> str:
        return (
            f"federation {self.federation!r} was created anew (incarnation "
            f"{self.identity.incarnation}, now {seen}): worker {self.worker_id} belongs to the "
            "old one"
        )

    # -- what the coordinator says ----------------------------------------------------------------
    def held(self, hold: Hold | None) -> None:
        """Keep the latest hold (why the last round decided nothing to apply); log a new
        reason once, not every round."""
        if hold is not None and hold.code != self._hold_said:
            log.info("worker %s holds: %s (%s)", self.worker_id, hold.reason, hold.code)
            self._hold_said = hold.code  # a reason coming back after merges is not news
        self.holds.observe(hold, self.worker_id)
        self.hold = hold

    def drop_sketch(self) -> None:
        """The federation's policy dropped its sketch since this worker registered."""
        if self.policy is not None:
            self.policy = self.policy.model_copy(update={"sketch": None})


def layer_specs(
    layers: Mapping[str, TetherParametrization], wire_dtype: WireDType
) -> list[LayerSpec]:
    """The layer table a worker registers; ValueError naming a layer the protocol cannot carry
    (a zero-size weight, a name over 256 characters)."""
    specs = []
    for name, tp in layers.items():
        shape = list(tp.storage().shape)
        try:
            specs.append(LayerSpec(name=name, shape=shape, dtype=wire_dtype))
        except ValidationError as error:
            problem = "it has a zero-size weight" if 0 in shape else _first_problem(error)
            raise ValueError(
                f"layer {name!r} (shape {shape}) cannot be federated: {problem}"
            ) from None
    return specs


def check_registration(name: str, specs: list[LayerSpec], meta: Mapping[str, Any]) -> None:
    """ValueError when the coordinator would refuse this registration (checked up front, on
    the caller's thread, not in the I/O thread)."""
    try:
        WorkerCreate(name=name, layers=specs, meta=dict(meta))
    except ValidationError as error:
        raise ValueError(f"cannot register worker {name!r}: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
