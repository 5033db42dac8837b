"""One error tree for the whole product.

    SyncError
    ├── ConfigError            the configuration is invalid (carries every problem found)
    ├── TemporaryError         worth retrying after `delay` seconds (network, 5xx, timeouts)
    │   └── ReadError          a registry read failed or was partial: nothing may be deleted
    └── PermanentError         retrying will not help (4xx, a record the peer refuses)
        └── ClashError         a native record holds the address a copy wants

Connectors map their SDK's or HTTP library's errors into this tree once, with
`raise ... from exc`, so the engine decides retries from the class alone.
"""

from __future__ import annotations

from collections.abc import Sequence


class SyncError(Exception):
    """Base of every error syncworker raises on purpose."""


class ConfigProblem(tuple[str, str]):
    """(path, message): where in the config a problem is and what it is."""

    __slots__ = ()

    def __new__(cls, path: str, message: str) -> ConfigProblem:
        return super().__new__(cls, (path, message))

    @property
    def path(self) -> str:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(SyncError):
    def __init__(self, problems: Sequence[ConfigProblem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class TemporaryError(SyncError):
    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class ReadError(TemporaryError):
    """A listing failed or came back incomplete; the unit is not reconciled this round."""


class PermanentError(SyncError):
    pass


class ClashError(PermanentError):
    pass
