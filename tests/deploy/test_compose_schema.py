"""docker-compose.yml against the Compose Specification JSON schema, plus what the schema cannot see.

The schema is vendored from a PyPI package (see tests/deploy/schemas/README.md)
and checked with `jsonschema` (draft 2020-12). The file is validated as loaded
by YAML, before Compose's own interpolation: `${VAR:-default}` strings are
plain strings to the schema, the way Compose validates them too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from syncworker.config import loader, settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
#: the sha256 that check-jsonschema 0.39.0 records for its vendored compose-spec.json
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

#: settings the deployment files set that syncworker/config/settings.py may not define yet (cluster mode)
CLUSTER_MODE_PENDING = {"SYNCWORKER_STATUS_HOST", "SYNCWORKER_FLOWER_AUTH"}

Doc = dict[str, Any]


def compose() -> Doc:
    data: Doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def problems(doc: Doc) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<top>'}: {e.message}"
            for e in sorted(validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


def known_settings() -> set[str]:
    names = set()
    for field in settings.Settings.model_fields.values():
        alias = field.validation_alias
        names.update(a for a in getattr(alias, "choices", []) if isinstance(a, str))
    return names


# ---- the schema ------------------------------------------------------------------------
def test_compose_schema_is_the_vendored_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "tests/deploy/schemas/compose-spec.json changed; see schemas/README.md for how to update it")


def test_compose_file_matches_the_compose_spec_schema() -> None:
    found = problems(compose())
    assert not found, "\n".join(found)


def _typo_in_a_service(doc: Doc) -> str:
    doc["services"]["worker"]["restat"] = "always"
    return "services.worker"


def _replicas_not_a_number(doc: Doc) -> str:
    doc["services"]["scheduler"]["deploy"]["replicas"] = {"count": 2}
    return "services.scheduler.deploy.replicas"


def _unknown_top_level_key(doc: Doc) -> str:
    doc["servics"] = doc.pop("services")
    return "<top>"


def _healthcheck_test_of_a_wrong_type(doc: Doc) -> str:
    doc["services"]["redis"]["healthcheck"]["test"] = 42
    return "services.redis.healthcheck.test"


@pytest.mark.parametrize("breakage", [_typo_in_a_service, _replicas_not_a_number, _unknown_top_level_key,
                                      _healthcheck_test_of_a_wrong_type],
                         ids=["typo", "replicas", "top-level", "healthcheck"])
def test_compose_schema_rejects_a_broken_file(breakage: Callable[[Doc], str]) -> None:
    broken = copy.deepcopy(compose())
    where = breakage(broken)
    found = problems(broken)
    assert found, "the broken copy passed the schema"
    assert any(p.startswith(where) for p in found), found


# ---- what the schema cannot see --------------------------------------------------------
def test_compose_runs_the_whole_cluster_and_the_demo_registries() -> None:
    services = compose()["services"]
    assert {"zookeeper", "redis", "scheduler", "worker", "flower", "nacos", "polaris"} <= set(services)
    ours = f"syncworker:{project_version()}"
    for role in ("scheduler", "worker", "flower"):
        svc = services[role]
        assert svc["image"] == ours, f"{role}: {svc['image']} (want {ours})"
        assert svc["command"][0] == role
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
    assert services["scheduler"]["deploy"]["replicas"] >= 2, "leader election needs a standby"
    assert "--status-port" in services["scheduler"]["command"]
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container name stops `--scale worker=N`"
    assert "ports" not in worker, "a published port stops `--scale worker=N`"
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_flower_basic_auth_has_no_default() -> None:
    flower = compose()["services"]["flower"]
    command = flower["command"]
    assert command[command.index("--address") + 1] == "0.0.0.0", "published ports cannot reach 127.0.0.1"
    env = flower["environment"]
    assert re.fullmatch(r"\$\{SYNCWORKER_FLOWER_AUTH:\?[^}]+\}", env["SYNCWORKER_FLOWER_AUTH"]), (
        "Flower's user:password must come from the caller's environment, required, with no default")


def test_compose_settings_point_at_the_compose_services() -> None:
    doc = compose()
    services = set(doc["services"])
    known = known_settings() | CLUSTER_MODE_PENDING
    for role in ("scheduler", "worker", "flower"):
        env = doc["services"][role]["environment"]
        unknown = {k for k in env if k.startswith("SYNCWORKER_")} - known
        assert not unknown, f"{role}: settings that syncworker does not read: {unknown}"
        assert env["SYNCWORKER_ZOOKEEPER"].split(":")[0] in services
        redis_host = re.match(r"redis://([^/:@]+)", env["SYNCWORKER_REDIS_URL"])
        assert redis_host is not None and redis_host.group(1) in services


def test_compose_mounts_a_valid_task_file_into_the_schedulers() -> None:
    example = loader.load(ROOT / "conf" / "sync-registry.json")
    scheduler = compose()["services"]["scheduler"]
    env = scheduler["environment"]
    mounts = {v.split(":")[1]: v for v in scheduler["volumes"] if v.startswith("./")}
    mount = mounts[env["SYNCWORKER_CONFIG_FILE"]]
    assert mount.endswith(":ro")
    config = loader.load(ROOT / mount.split(":")[0])
    assert [t.name for t in config.enabled_tasks()] == [t.name for t in example.enabled_tasks()]
    assert not env["SYNCWORKER_CONFIG_BACKUP"].startswith("/etc/syncworker/"), "backup on a read-only mount"
