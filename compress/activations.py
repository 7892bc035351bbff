"""The activations of every window between two decoder blocks, held in memory or on disk.

The block walk reads these a batch at a time and writes each block's outputs back over its
inputs, so the stream is the largest thing calibration keeps besides one block (64 x 512
windows of a 576-wide model are 75 MB in float32; 128 x 2048 of a 4096-wide one, 4.3 GB). On
disk it lives in an unlinked temporary file: the kernel's page cache holds what fits and can
drop it under pressure, the process holds one batch, and nothing is left behind when the run
ends, however it ends. Reads return fresh tensors in both modes, so a batch can be overwritten
in the stream while its forward still runs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch


class WindowStream:
    """``n`` windows of shape ``[L, D]`` in one dtype; ``spool_dir`` puts them in a file there."""

    def __init__(self, n: int, device: torch.device | str = "cpu", spool_dir: Optional[Path] = None):
        self.n = n
        self.device = torch.device(device)
        self.spool_dir = spool_dir
        self._shape: Optional[tuple[int, ...]] = None  # of one window, set by the first write
        self._dtype: Optional[torch.dtype] = None
        self._data: Optional[torch.Tensor] = None  # memory mode
        self._fd: Optional[int] = None  # disk mode
        self._window_bytes = 0

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> "WindowStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def on_disk(self) -> bool:
        return self.spool_dir is not None

    @property
    def window_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            raise RuntimeError("nothing has been written to this stream yet")
        return self._shape

    def _allocate(self, x: torch.Tensor) -> None:
        self._shape, self._dtype = tuple(x.shape[1:]), x.dtype
        if not self.on_disk:
            self._data = torch.empty(self.n, *self._shape, dtype=x.dtype, device=self.device)
            return
        self._window_bytes = x[0].numel() * x.element_size()
        fd, path = tempfile.mkstemp(prefix=".compress-activations-", dir=self.spool_dir)
        os.unlink(path)  # the open descriptor keeps it; it is gone when the descriptor closes
        self._fd = fd

    def write(self, start: int, x: torch.Tensor) -> None:
        """Windows ``start .. start + len(x)`` become ``x`` (``[b, L, D]``)."""
        if self._shape is None:
            self._allocate(x)
        if tuple(x.shape[1:]) != self._shape or x.dtype != self._dtype:
            raise ValueError(f"stream holds {self._shape} {self._dtype} windows; got {tuple(x.shape[1:])} {x.dtype}")
        if start < 0 or start + x.shape[0] > self.n:
            raise IndexError(f"windows {start}..{start + x.shape[0]} of a stream of {self.n}")
        if self._data is not None:
            self._data[start : start + x.shape[0]].copy_(x)
            return
        buf = _bytes_of(x.detach().to("cpu").contiguous())
        try:
            _full(os.pwritev, self._fd, buf, start * self._window_bytes)
        except OSError as e:  # a full disk names no file: name the spool's folder
            if e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, f"{self.spool_dir} (activation spool)") from e

    def read(self, start: int, stop: int) -> torch.Tensor:
        """A fresh ``[stop - start, L, D]`` tensor of those windows, on the stream's device."""
        stop = min(stop, self.n)
        if start < 0 or start >= stop:
            raise IndexError(f"windows {start}..{stop} of a stream of {self.n}")
        if self._data is not None:
            return self._data[start:stop].clone()
        out = torch.empty(stop - start, *self.window_shape, dtype=self._dtype)
        _full(os.preadv, self._fd, _bytes_of(out), start * self._window_bytes)
        return out.to(self.device)

    def close(self) -> None:
        self._data = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (any dtype, bfloat16 too)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _full(op, fd: int, buf: memoryview, offset: int) -> None:
    """Repeat `os.preadv`/`os.pwritev` until the whole buffer is done (they may stop short)."""
    done = 0
    while done < len(buf):
        n = op(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"activation spool: {'read' if op is os.preadv else 'write'} stopped at byte "
                          f"{offset + done} (disk full or file truncated?)")
        done += n
