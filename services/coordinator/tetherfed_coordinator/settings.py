"""The coordinator's one settings class (env prefix `TETHER_`, plus `REDIS_URL`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .topology import parse_redis_url


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything the coordinator reads from its environment, validated at start-up."""

    # An empty variable means unset (compose writes `TETHER_TOKEN=${TETHER_TOKEN:-}`): an empty
    # token would otherwise turn auth on with a token no client can send.
    model_config = SettingsConfigDict(
        env_prefix="TETHER_", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8420, ge=0, le=65535)
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TETHER_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis to use; None starts an embedded redis-server.",
    )
    data_dir: Path | None = Field(
        default=None, description="Embedded Redis: directory for its AOF (None: in memory only)."
    )
    key_prefix: str = Field(
        default="tetherfed:",
        min_length=1,
        pattern=r"^[^{}]+$",
        description="Prefix of every key; no braces (federation names are the hash tags).",
    )
    wait_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Replicas that must hold a decision or ack before it counts as written "
        "(Redis WAIT; one server or Sentinel). 0: do not wait.",
    )
    wait_timeout_ms: int = Field(default=2000, ge=1, description="How long WAIT waits.")
    token: str | None = Field(
        default=None, description="Bearer token; None (or empty) turns auth off."
    )
    read_token: str | None = Field(
        default=None,
        description="With `token` set: a bearer token that may read every federation (list, "
        "workers, decisions, compatibility, streams) and change nothing; the dashboard's.",
    )

    @field_validator("token", "read_token", "redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    allow_eviction: bool = Field(
        default=False,
        description="Start on a Redis whose maxmemory-policy may evict any key (allkeys-*), "
        "with a warning; by default the coordinator refuses: its keys have no TTL and their "
        "loss stops the federation.",
    )
    max_frame_bytes: int = Field(default=1 << 30, ge=64)
    max_json_bytes: int = Field(
        default=8 << 20,
        ge=1024,
        description="Largest JSON request body (telemetry batches: at least 64 MiB); a larger "
        "one is refused with 413 once its sender is authenticated, before it is read.",
    )
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)
    stream_maxlen: int = Field(default=100_000, ge=10, description="Approximate MAXLEN of streams.")
    consumer_name: str = Field(default_factory=_default_consumer)
    scoring_enabled: bool = True
    scorer_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Scoring processes to start; 0 scores on a thread of the API process.",
    )
    scoring_block_ms: int = Field(default=1000, ge=1)
    reclaim_idle_ms: int = Field(
        default=30_000, ge=1, description="A pending scoring entry idle this long is reclaimed."
    )
    long_poll_max_s: float = Field(default=30.0, ge=0)
    snapshot_pin_s: float = Field(
        default=60.0,
        gt=0,
        description="A partner snapshot a merge or drift decision names stays readable "
        "(`?version=`) this long after a newer publish replaced it; a worker applying the "
        "decision later acks it rejected.",
    )
    sse_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        description="Seconds between keep-alive comments of an idle decision stream, stated "
        "in its `X-Tether-Keepalive` header; the SDK gives up on a stream silent for 3 of "
        "them plus 2 s.",
    )
    telemetry_maxlen: int = Field(
        default=2000, ge=1, description="Telemetry points kept per worker, metric and layer."
    )

    @field_validator("redis_url")
    @classmethod
    def _known_deployment(cls, url: str | None) -> str | None:
        if url is not None:
            parse_redis_url(url)  # ValueError naming the problem
        return url

    @model_validator(mode="after")
    def _wait_needs_replication(self) -> Settings:
        if (
            self.wait_replicas
            and self.redis_url
            and parse_redis_url(self.redis_url).kind == "cluster"
        ):
            raise ValueError("wait_replicas is for one server or Sentinel, not a Redis Cluster")
        return self
