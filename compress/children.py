"""Child processes that never outlive the run that started them.

`run_child` is `subprocess.run` (which already kills the child when the parent is interrupted
or fails while waiting) plus the parent's PID in the environment. The child calls
`die_with_parent` first thing: on Linux it asks the kernel to SIGKILL it when the parent dies
(prctl PR_SET_PDEATHSIG, prctl(2)), which also covers a parent killed with SIGKILL, where no
Python code of the parent runs.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

PARENT_PID = "COMPRESS_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` to completion, capturing its output as text."""
    env = {**os.environ, PARENT_PID: str(os.getpid())}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def die_with_parent() -> None:
    """In a child started by `run_child`: be killed when the parent dies; exit now if it already
    has. Does nothing outside Linux or when not started by `run_child`."""
    parent = os.environ.get(PARENT_PID)
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this child may outlive its parent",
                    ctypes.get_errno())
    # The parent may have died before the request took effect; the child is then re-parented.
    if os.getppid() != int(parent):
        os._exit(1)
