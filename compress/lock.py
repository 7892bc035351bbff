"""One run at a time per output folder.

A run holds ``fcntl.flock`` on ``OUT/.compress.lock`` (which records its PID and host) from
before it reads anything until it ends; a second run on the same folder fails at once naming
the holder, instead of doing all the work and then losing a race for the final rename. The
kernel drops the lock when the holder dies, however it dies, so a stale lock file never blocks.
While holding the lock, a run removes the ``.partial-`` folders that runs which died left there
(compress/owner.py decides which).
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from compress.owner import owner_record, sweep_dead

log = logging.getLogger(__name__)

LOCK = ".compress.lock"


class OutputBusy(Exception):
    """Another live run holds the output folder."""


class OutputLock:
    """Context manager: hold `out_dir` (created if missing, and removed again if it was created
    here and is empty at the end) or raise :class:`OutputBusy`."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK
        self._fd: Optional[int] = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        from compress.config import ConfigError
        from compress.paths import unwritable_dir

        why = unwritable_dir(self.out_dir)  # mkdir would say only "File exists" or "Read-only"
        if why:
            raise ConfigError(f"export.output_dir: {why}")
        self._created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = self._lock()
        except BaseException:
            self._remove_if_created()
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, (json.dumps(owner_record()) + "\n").encode())
        return self

    def _lock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputBusy(
                    f"export.output_dir: {self.out_dir} is in use by another compress run ({holder}); "
                    "wait for it to end or choose another output_dir"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # A holder unlinks the file as it lets go; a lock taken on that unlinked file would
            # exclude nobody, so lock whatever file the path names now.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                return fd
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before unlocking: see _lock
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.out_dir.rmdir()  # only when empty: a run that failed before writing anything
            except OSError:
                pass


def _holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode())
        return f"PID {int(rec['pid'])} on {rec['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # it has locked but not yet written
        return "PID not yet recorded"


def holding_output_dir(run: Callable) -> Callable:
    """Decorate `run(cfg, out_dir=None, **options)`: the output folder is locked and cleared of
    dead runs' partial folders before `run` starts, and released when it ends. (The resume
    store, ``.resume``, is not a partial folder: only `run` itself keeps or discards it.)"""

    @functools.wraps(run)
    def locked(cfg, out_dir: Optional[Path] = None, **options):
        out = Path(out_dir or cfg.export.output_dir)
        with OutputLock(out):
            sweep_dead(out)
            return run(cfg, out, **options)

    return locked
