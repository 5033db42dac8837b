"""Where the running config comes from: a file, reloaded on change, with a last-good backup.

A change is read, validated as a whole, and only then handed over; a bad file is
reported with every problem and the running config stays in force. Each accepted
config is written to the backup path, so that a restart with a broken file, or a
task removed while the process was down, can be handled from the last good one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from syncworker import errors
from syncworker.config import loader, models

log = logging.getLogger("syncworker.config")


class FileProvider:
    def __init__(self, path: str | Path, backup: str | Path) -> None:
        self.path = Path(path)
        self.backup = Path(backup)
        self._digest = ""
        self.last_error: errors.ConfigError | None = None

    def _read(self) -> tuple[str, str]:
        text = self.path.read_text(encoding="utf-8")
        return text, hashlib.sha256(text.encode()).hexdigest()

    def load_initial(self) -> models.RegistryConfig:
        """The config at start; raises ConfigError when the file is bad (the caller decides)."""
        text, digest = self._read()
        config = loader.load_text(text, str(self.path))
        self._digest = digest
        return config

    def previous(self) -> models.RegistryConfig | None:
        """The last good config from the backup, if there is a readable one."""
        try:
            return loader.load(self.backup)
        except errors.ConfigError:
            return None

    def save_backup(self) -> None:
        text, _ = self._read()
        tmp = self.backup.with_name(self.backup.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.backup)

    def poll(self) -> models.RegistryConfig | None:
        """A new valid config when the file changed, else None (bad changes are logged and kept out)."""
        try:
            text, digest = self._read()
        except OSError as exc:
            log.error("config file unreadable; running config stays", extra={"path": str(self.path),
                                                                               "error": str(exc)})
            return None
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            config = loader.load_text(text, str(self.path))
        except errors.ConfigError as exc:
            self.last_error = exc
            log.error("config change refused; running config stays in force",
                      extra={"path": str(self.path), "problems": [str(p) for p in exc.problems]})
            return None
        self.last_error = None
        return config
