"""Fixtures for the contract-double tests: a fresh double per test on a port from the project's allocator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncworker.sandbox.ports import PortAllocator
from tests.doubles.apisix_admin_double import ApisixAdminDouble
from tests.doubles.fixtures import running_apisix_double, running_kong_double
from tests.doubles.kong_admin_double import KongAdminDouble


@pytest.fixture(scope="session")
def double_ports() -> Iterator[PortAllocator]:
    alloc = PortAllocator()
    yield alloc
    alloc.release_all()


@pytest.fixture
def kong(double_ports: PortAllocator) -> Iterator[KongAdminDouble]:
    with running_kong_double(double_ports) as double:
        yield double


@pytest.fixture
def apisix(double_ports: PortAllocator) -> Iterator[ApisixAdminDouble]:
    with running_apisix_double(double_ports) as double:
        yield double
