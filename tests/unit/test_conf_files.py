"""Every shipped task file passes the loader (what `syncworker check` runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncworker.config import loader

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.*")), ids=lambda p: p.name)
def test_shipped_task_file_is_valid(path: Path) -> None:
    config = loader.load(path)
    assert config.enabled_tasks(), f"{path.name} has no enabled task"
