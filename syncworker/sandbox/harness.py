"""A pool of started peers (one per name) and the check that nothing outlives it.

Tests ask the session-scoped pool for a peer by name; it is started the first
time it is asked for and stopped when the session ends. Every peer runs in a run
directory under `base.run_root()`, so any process whose command line or working
directory points there and that is still alive after `stop_all` is a leak.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from syncworker.sandbox import base, catalog, ports


class PeerPool:
    def __init__(self) -> None:
        self.alloc = ports.PortAllocator()
        self._running: dict[str, base.Running] = {}
        self._failed: dict[str, str] = {}

    def get(self, name: str, **options: object) -> base.Running:
        """The running peer `name`, started now if it is not yet. A failed start fails every asker."""
        key = name if not options else f"{name}:{sorted(options.items())}"
        if key in self._failed:
            raise base.PeerError(self._failed[key])
        running = self._running.get(key)
        if running is not None and running.alive():
            return running
        try:
            running = catalog.get(name).start(self.alloc, **options)
        except base.PeerError as exc:
            self._failed[key] = str(exc)
            raise
        self._running[key] = running
        return running

    def fresh(self, name: str, **options: object) -> base.Running:
        """A new instance the caller owns (stop it yourself; also stopped with the pool)."""
        running = catalog.get(name).start(self.alloc, **options)
        self._running[f"{name}#{running.pid}"] = running
        return running

    def stop_all(self) -> None:
        for running in reversed(list(self._running.values())):
            running.stop()
        self._running.clear()
        self.alloc.release_all()


def _proc_refs_run_root(pid_dir: Path, root: str) -> str | None:
    try:
        cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    cwd = ""
    with contextlib.suppress(OSError):
        cwd = os.readlink(pid_dir / "cwd")
    if root in cmdline or cwd.startswith(root):
        return cmdline.strip() or cwd
    return None


def leftover_processes() -> list[tuple[int, str]]:
    """Live processes started by this session's peers (in a run directory, tagged with our session id)."""
    root = str(base.run_root())
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if not base.pid_alive(int(entry.name)) or not _ours(entry):
            continue
        cmd = _proc_refs_run_root(entry, root)
        if cmd:
            found.append((int(entry.name), cmd))
    return found


def _ours(pid_dir: Path) -> bool:
    """Started in this session (peers of another test run or of `syncworker sandbox up` are not ours)."""
    with contextlib.suppress(OSError):
        environ = (pid_dir / "environ").read_bytes().split(b"\0")
        return f"{base.SESSION_ENV}={base.SESSION_ID}".encode() in environ
    return False


def kill_leftovers(leftovers: list[tuple[int, str]]) -> None:
    for pid, _ in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
