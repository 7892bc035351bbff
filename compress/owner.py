"""Temporary folders that say who made them, so debris of a killed run can be told from work
in progress and removed.

A run killed with SIGKILL (or by the OOM killer, or a power cut) runs no cleanup: its
``.<name>.partial-<random>`` folders stay. Each such folder holds ``.owner.json`` with the PID,
host and start time of the process that made it; :func:`sweep_dead` removes a folder only when
that process is known to be gone: same host, and the PID no longer runs or now belongs to a
process started at another time (PID reuse). A record from another host, an unreadable one or
none at all means "unknown" and the folder is kept.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

OWNER = ".owner.json"
PARTIALS = ".*.partial-*"  # every folder made by make_partial with a hidden prefix


def _start_ticks(pid: int) -> Optional[int]:
    """Start time of `pid` in clock ticks since boot (proc(5), /proc/PID/stat field 22); None
    where /proc is missing or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def make_partial(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><random>`` holding this process's owner record.
    (Made with mkdir, not mkdtemp, so a folder later renamed into place keeps the umask's mode.)"""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    (folder / OWNER).write_text(json.dumps(owner_record()) + "\n")
    return folder


def owner_gone(folder: Path) -> bool:
    """True only when `folder`'s owner record names a process of this host that has ended."""
    try:
        rec = json.loads((Path(folder) / OWNER).read_text())
        pid, host, start = int(rec["pid"]), rec["host"], rec.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        pass
    now = _start_ticks(pid)
    return start is not None and now is not None and now != start


def sweep_dead(parent: Path, pattern: str = PARTIALS) -> list[Path]:
    """Remove the folders of `parent` matching `pattern` whose owner is gone; returns them."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for folder in sorted(Path(parent).glob(pattern)):
        if folder.is_dir() and not folder.is_symlink() and owner_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a run that no longer exists", folder)
            removed.append(folder)
    return removed
