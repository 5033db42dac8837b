"""Fresh in-memory registries for every unit test (memory stores are shared by name)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncworker.connectors import memory


@pytest.fixture(autouse=True)
def fresh_stores() -> Iterator[None]:
    memory.STORES.clear()
    yield
    memory.STORES.clear()
