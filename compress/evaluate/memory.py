"""Peak resident memory of this process, sampled in a background thread.

`ru_maxrss` alone cannot tell a stage's peak from an earlier one, so a sampler records the
peak between `start` and `stop`; CUDA peaks come from the allocator's own counters.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@dataclass
class PeakMemory:
    interval_s: float = 0.02
    baseline: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        self.baseline = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def release_freed() -> None:
    """Hand memory that Python and torch freed back to the OS (glibc keeps it otherwise), so
    one stage's high-water mark does not carry over as resident memory into the next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc `malloc_trim`), without a garbage collection:
    cheap enough to call once per decoder block, so the freed temporaries of one block's
    passes do not stay resident under the next block's."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
