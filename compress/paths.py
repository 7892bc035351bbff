"""Checks on the folders a run writes to, made before any work (output and cache folders)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def unwritable_dir(path: str | Path) -> Optional[str]:
    """Why `path` cannot be used (or created) as a writable folder, or None when it can.

    A folder that does not exist yet is judged by its nearest existing ancestor, which is
    where `mkdir(parents=True)` would have to write. As root, permission bits do not stop a
    write, but a read-only mount does (`access(2)` reports EROFS), so both are caught.
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder"
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{p} cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable"
        return f"{existing} {why}" if existing == p else f"{p} cannot be created: {existing} {why}"
    return None
