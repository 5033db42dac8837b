"""Start and stop the contract doubles for a test: context managers plus the pytest fixtures built on them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from syncworker.sandbox.ports import PortAllocator
from tests.doubles._server import DoubleServer, Reply, Request
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


def answer(monkeypatch: pytest.MonkeyPatch, double: DoubleServer, method: str, path: str, reply: Reply) -> None:
    """Make `double` answer `method path` (the path exactly, query aside) with `reply` until the test ends
    (or `monkeypatch.undo()`); every other request as usual."""
    original = double.handle

    def handle(request: Request) -> Reply:
        if request.method == method and request.raw_path.split("?", 1)[0] == path:
            return reply
        return original(request)

    monkeypatch.setattr(double, "handle", handle)
