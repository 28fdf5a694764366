"""Every Redis key the coordinator uses, built here under one prefix.

What is kept, and so the memory used, per worker: one hash, one liveness key, the latest frame (as
segments of just under 1 MiB, see `segment`; an upload in flight adds its own, with a TTL; a
superseded frame keeps the segments of layers unacked decisions name, see `pin`), its
metadata hash, merge counts and cooldowns (one hash each, bounded by layers × peers), its
decision stream (approximate MAXLEN), per layer a generation record list (metadata of every
generation, small) and at most `policy.retain_generations` generation tensors; under the
`update_cosine` measure, a copy of its first frame (`origin`, kept as long as the worker). Per
federation: a hash, the worker set, the token index, the decision counter, the decision stream
(approximate MAXLEN) and the ack hash. One scoring stream for all federations (trimmed, entries acked).
Telemetry (diagnostics): per worker an index hash and one sorted set per metric and layer, each
trimmed to `telemetry_maxlen` points.

Redis Cluster: every key of a federation starts `<prefix>{<federation>}`, so its
name is the key's hash tag and all of a federation's keys live in one slot: every script and
transaction touches one slot. The global keys (`federations`, `stats`, `scoring`) are never
used in a script or transaction with a federation's keys.
"""

from __future__ import annotations

import re

_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """`text` with Redis glob metacharacters escaped, for SCAN MATCH patterns."""
    return _GLOB.sub(r"\\\1", text)


class Keys:
    """Key builder for one prefix (e.g. `tetherfed:`)."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix {prefix!r} must not hold braces (they make hash tags)")
        self.prefix = prefix

    # global
    def federations(self) -> str:
        """Set of federation names."""
        return f"{self.prefix}federations"

    def stats(self) -> str:
        """Hash of coordinator-wide counters (scoring rounds and time, decisions by action),
        shared by every replica and scoring process."""
        return f"{self.prefix}stats"

    def scoring(self) -> str:
        """The scoring queue (a stream read by the `scorers` consumer group)."""
        return f"{self.prefix}scoring"

    # per federation
    def federation(self, fed: str) -> str:
        """Hash: policy (JSON), created_at. Its name is the prefix of the federation's keys."""
        return f"{self.prefix}{{{fed}}}"

    def federation_match(self, fed: str) -> str:
        """SCAN pattern of every key below a federation."""
        return glob_escape(f"{self.federation(fed)}:") + "*"

    def legacy_federation(self, fed: str) -> str:
        """Where versions before hash tags kept the federation hash (its keys were below
        `<this>:`); `Store.migrate_legacy` renames them."""
        return f"{self.prefix}fed:{fed}"

    def workers(self, fed: str) -> str:
        """Set of worker ids."""
        return f"{self.federation(fed)}:workers"

    def tokens(self, fed: str) -> str:
        """Hash: sha256(token) → worker id."""
        return f"{self.federation(fed)}:tokens"

    def decision_seq(self, fed: str) -> str:
        """Counter: the last decision id."""
        return f"{self.federation(fed)}:decision_seq"

    def decisions(self, fed: str) -> str:
        """Stream of every decision; entry id `<decision id>-0`."""
        return f"{self.federation(fed)}:decisions"

    def fence(self, fed: str) -> str:
        """Counter written just before a WAIT that must cover every earlier write."""
        return f"{self.federation(fed)}:fence"

    def acks(self, fed: str) -> str:
        """Hash: decision id → AckPublic JSON."""
        return f"{self.federation(fed)}:acks"

    # per worker
    def worker(self, fed: str, wid: str) -> str:
        """Hash: the worker record (name, layers, meta, token hash, progress, version)."""
        return f"{self.federation(fed)}:w:{wid}"

    def alive(self, fed: str, wid: str) -> str:
        """String with the heartbeat TTL; its absence means lost."""
        return f"{self.federation(fed)}:w:{wid}:alive"

    def segment_base(self, fed: str, wid: str) -> str:
        """Prefix of the worker's frame segments: `<base><upload tag>:<index>` (see `segment`)."""
        return f"{self.federation(fed)}:w:{wid}:seg:"

    def segment(self, fed: str, wid: str, tag: str, index: int) -> str:
        """String: bytes `[index * segment size, ...)` of the frame uploaded under `tag`.

        A frame is stored as segments of at most `ingest.SEGMENT` bytes. The snapshot meta hash
        names the current tag and count; an upload writes its segments with a TTL, and the
        publish script makes them permanent and unlinks the previous tag's in one step.
        """
        return f"{self.segment_base(fed, wid)}{tag}:{index}"

    def legacy_snapshot(self, fed: str, wid: str) -> str:
        """A frame stored whole (before segments): read while its meta names no segments, and
        unlinked by the worker's next publish."""
        return f"{self.federation(fed)}:w:{wid}:snap"

    def pin(self, fed: str, wid: str, version: int) -> str:
        """Hash with a TTL: a copy of the snapshot meta hash of `version`, written by the
        commit of a decision naming that snapshot as its partner's (only while it is still the
        latest), plus `d:<decision id>` → layer for each unacked such decision and
        `L:<layer>` → where that layer's bytes lie (segment indices, offsets, dtype, shape).
        A publish replacing the snapshot keeps only the segments those layers lie in (they
        expire with the pin); an ack drops its `d:` field and the segments no other unacked
        decision needs (`release.lua`)."""
        return f"{self.worker(fed, wid)}:pin:{version}"

    def snapshot_meta(self, fed: str, wid: str) -> str:
        """Hash: version, step, epoch, loss, previous loss, SnapshotMeta JSON, segment tag and
        count."""
        return f"{self.federation(fed)}:w:{wid}:snapmeta"

    def origin(self, fed: str, wid: str) -> str:
        """Hash: the snapshot meta hash of the worker's origin, its first publish under the
        `update_cosine` measure (a copy; `segments` names how many `origin_segment`s hold the
        frame). Written once, never changed; unlinked with the worker or its federation."""
        return f"{self.worker(fed, wid)}:origin"

    def origin_segment(self, fed: str, wid: str, index: int) -> str:
        """String: bytes `[index * segment size, ...)` of the origin's frame (a copy of the
        segment of that index when the origin was published)."""
        return f"{self.worker(fed, wid)}:origin:{index}"

    def sketch(self, fed: str, wid: str) -> str:
        """Hash: the worker's latest sketch publish (version, step, epoch, loss, previous loss,
        SnapshotMeta JSON, the sketch frame)."""
        return f"{self.worker(fed, wid)}:sketch"

    def worker_decisions(self, fed: str, wid: str) -> str:
        """Stream of the merge/drift decisions addressed to this worker."""
        return f"{self.federation(fed)}:w:{wid}:decisions"

    def merges(self, fed: str, wid: str) -> str:
        """Hash: `__epoch` and layer → merges received this epoch."""
        return f"{self.federation(fed)}:w:{wid}:merges"

    def cooldowns(self, fed: str, wid: str) -> str:
        """Hash: `layer\\x00partner` → step of the pair's last merge or drift."""
        return f"{self.federation(fed)}:w:{wid}:cooldowns"

    def applied(self, fed: str, wid: str) -> str:
        """Hash: `layer\\x00generation` → JSON of the acked decision that made it."""
        return f"{self.federation(fed)}:w:{wid}:applied"

    def generations(self, fed: str, wid: str, layer: str) -> str:
        """List of GenerationRecord JSON (every generation's metadata)."""
        return f"{self.federation(fed)}:w:{wid}:gen:{layer}"

    def retained(self, fed: str, wid: str, layer: str) -> str:
        """List of generation numbers whose tensors are kept (capped by policy)."""
        return f"{self.federation(fed)}:w:{wid}:genkeep:{layer}"

    def generation_tensor(self, fed: str, wid: str, layer: str, generation: int) -> str:
        """One retained generation's tensor (a one-layer frame)."""
        return f"{self.federation(fed)}:w:{wid}:gent:{generation}:{layer}"

    def telemetry(self, fed: str, wid: str, metric: str, layer: str) -> str:
        """Sorted set: the worker's telemetry points of one metric and layer (JSON), scored by
        step, trimmed to the newest `telemetry_maxlen`."""
        return f"{self.worker(fed, wid)}:tm:{metric}:{layer}"

    def telemetry_index(self, fed: str, wid: str) -> str:
        """Hash: `metric\x00layer` → step of the last point, one field per series the worker has."""
        return f"{self.worker(fed, wid)}:tmindex"
