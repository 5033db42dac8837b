"""JSON on the wire, through orjson.

A whole-namespace read of a large registry is thousands of records several times a
minute, and the standard library's decoder was the largest single cost of the sync
process during an initial sync (a fifth of its CPU, next to the servers on the same
cores); orjson does the same work several times faster. Both raise ValueError
subclasses on bad input, so callers keep their `except ValueError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

#: the content type of what `dumps` gives
CONTENT_TYPE = "application/json"


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document (UTF-8 bytes or text); ValueError when it is not JSON."""
    return orjson.loads(data)


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """UTF-8 JSON bytes; dict keys that are not strings are written as strings."""
    return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)
