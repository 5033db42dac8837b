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
    zookeeper: str = Field("127.0.0.1:2181", validation_alias=_env("ZOOKEEPER"))
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"), validation_alias=_env("REDIS_URL"))

    def backup_path(self, config_file: str) -> str:
        return self.config_backup or f"{config_file}.last-good"
