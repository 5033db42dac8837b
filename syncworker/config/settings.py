"""Process settings from the environment (pydantic-settings).

Our names are `SYNCWORKER_*`; polaris-sync's `POLARIS_SYNC_*` names are accepted
too, so a deployment switching over keeps its environment:
`POLARIS_SYNC_REGISTRY_CONFIG_PROVIDER` -> config_provider,
`POLARIS_SYNC_CONFIG_FILE_WATCH` -> config_file,
`POLARIS_SYNC_REGISTRY_CONFIG_BACKUP_PATH` -> config_backup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str, *polaris_sync: str) -> AliasChoices:
    return AliasChoices(f"SYNCWORKER_{name}", *polaris_sync)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNCWORKER_", extra="ignore", populate_by_name=True)

    config_provider: Literal["file", "redis"] = Field(
        "file", validation_alias=_env("CONFIG_PROVIDER", "POLARIS_SYNC_REGISTRY_CONFIG_PROVIDER"))
    config_file: str = Field(
        "conf/sync-registry.json", validation_alias=_env("CONFIG_FILE", "POLARIS_SYNC_CONFIG_FILE_WATCH"))
    config_backup: str = Field(
        "", validation_alias=_env("CONFIG_BACKUP", "POLARIS_SYNC_REGISTRY_CONFIG_BACKUP_PATH"))
    report_file: str = Field("syncworker-report.jsonl", validation_alias=_env("REPORT_FILE"))
    log_level: str = Field("INFO", validation_alias=_env("LOG_LEVEL"))
    log_format: Literal["json", "text"] = Field("text", validation_alias=_env("LOG_FORMAT"))
    workers: int = Field(16, ge=1, validation_alias=_env("WORKERS"))
    reload_interval: float = Field(1.0, gt=0, validation_alias=_env("RELOAD_INTERVAL"))
    #: the /status, /metrics and /healthz endpoint on 127.0.0.1 (unset: off; 0: any free port)
    status_port: int | None = Field(None, ge=0, le=65535, validation_alias=_env("STATUS_PORT"))
    #: the scheduler's status endpoint address: loopback by default; 0.0.0.0 in a pod or container so that
    #: probes and Prometheus reach it
    status_host: str = Field("127.0.0.1", validation_alias=_env("STATUS_HOST"))
    zookeeper: str = Field("127.0.0.1:2181", validation_alias=_env("ZOOKEEPER"))
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), validation_alias=_env("REDIS_URL"))

    # ---- cluster mode (`syncworker scheduler`, `syncworker worker`) ----------------------
    #: prefix of every key in Redis and the name of the Celery queue: clusters sharing one Redis differ here
    redis_prefix: str = Field("syncworker", min_length=1, validation_alias=_env("REDIS_PREFIX"))
    #: the ZooKeeper node under which schedulers elect their leader
    zk_root: str = Field("/syncworker", validation_alias=_env("ZK_ROOT"))
    #: ZooKeeper session timeout: a dead leader is replaced after about this long (server bounds: 2-20 ticks)
    zk_session_timeout: float = Field(6.0, gt=0, validation_alias=_env("ZK_SESSION_TIMEOUT"))
    #: a unit's lock lives this long unless its holder renews it (every third of it)
    lock_ttl: float = Field(15.0, gt=0, validation_alias=_env("LOCK_TTL"))
    #: a watch or heartbeat duty's lease lives this long unless its holder renews it
    lease_ttl: float = Field(10.0, gt=0, validation_alias=_env("LEASE_TTL"))
    #: a worker or scheduler counts as gone when it has not said it is alive for this long
    alive_ttl: float = Field(6.0, gt=0, validation_alias=_env("ALIVE_TTL"))
    #: a duty hands its lease back after this long and the leader dispatches it afresh
    #: (bounds the broker's visibility timeout)
    duty_max: float = Field(600.0, gt=0, validation_alias=_env("DUTY_MAX"))
    #: seconds between listings of "*" namespaces (new services) by the leader
    discover_interval: float = Field(10.0, gt=0, validation_alias=_env("DISCOVER_INTERVAL"))
    #: seconds between heartbeats of ephemeral copies (destinations that need them)
    heartbeat_interval: float = Field(5.0, gt=0, validation_alias=_env("HEARTBEAT_INTERVAL"))
    #: a queued reconcile that no live worker took within this long is dispatched again
    queue_timeout: float = Field(300.0, gt=0, validation_alias=_env("QUEUE_TIMEOUT"))
    #: `syncworker worker` defaults
    worker_concurrency: int = Field(8, ge=1, validation_alias=_env("WORKER_CONCURRENCY"))
    worker_pool: Literal["threads", "prefork", "solo"] = Field("threads", validation_alias=_env("WORKER_POOL"))
    #: `syncworker flower`: basic auth as user:password (required: Flower is never served without it)
    flower_auth: SecretStr = Field(SecretStr(""), validation_alias=_env("FLOWER_AUTH"))

    def backup_path(self, config_file: str) -> str:
        return self.config_backup or f"{config_file}.last-good"
