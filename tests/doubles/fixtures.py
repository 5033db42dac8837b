"""Start and stop the contract doubles for a test: context managers plus the pytest fixtures built on them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from syncworker.sandbox.ports import PortAllocator
from tests.doubles.apisix_admin_double import ApisixAdminDouble
from tests.doubles.kong_admin_double import KongAdminDouble


@contextmanager
def running_kong_double(alloc: PortAllocator | None = None, **options: Any) -> Iterator[KongAdminDouble]:
    """A started Kong Admin API double on a port from `alloc` (or any free port), stopped afterwards."""
    port = alloc.one() if alloc is not None else 0
    double = KongAdminDouble(port=port, **options).start()
    try:
        yield double
    finally:
        double.stop()


@contextmanager
def running_apisix_double(alloc: PortAllocator | None = None, **options: Any) -> Iterator[ApisixAdminDouble]:
    """A started APISIX Admin API double on a port from `alloc` (or any free port), stopped afterwards."""
    port = alloc.one() if alloc is not None else 0
    double = ApisixAdminDouble(port=port, **options).start()
    try:
        yield double
    finally:
        double.close()
