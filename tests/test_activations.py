"""WindowStream: the same windows back from memory and from its spool file, in every dtype."""
from __future__ import annotations

import os

import pytest
import torch

from compress.activations import WindowStream


def _fill(stream: WindowStream, x: torch.Tensor, batch: int) -> None:
    for s in range(0, x.shape[0], batch):
        stream.write(s, x[s : s + batch])


@pytest.mark.parametrize("spool", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_in_batches(spool, dtype, tmp_path):
    x = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    with WindowStream(7, spool_dir=tmp_path if spool else None) as st:
        _fill(st, x, 3)  # 3 + 3 + 1
        assert st.window_shape == (5, 3) and len(st) == 7
        assert torch.equal(st.read(0, 7), x)
        assert torch.equal(st.read(2, 5), x[2:5])
        assert torch.equal(st.read(6, 10), x[6:])  # a read past the end stops at the end
        y = -x[1:3]
        st.write(1, y)
        assert torch.equal(st.read(0, 7), torch.cat([x[:1], y, x[3:]]))


@pytest.mark.parametrize("spool", [False, True])
def test_reads_are_copies(spool, tmp_path):
    """Overwriting a batch in the stream must not change a batch read from it before."""
    x = torch.arange(12.0).reshape(4, 3, 1)
    with WindowStream(4, spool_dir=tmp_path if spool else None) as st:
        _fill(st, x, 4)
        batch = st.read(0, 2)
        st.write(0, torch.zeros(2, 3, 1))
        assert torch.equal(batch, x[:2])
        batch.fill_(7)
        assert torch.equal(st.read(0, 2), torch.zeros(2, 3, 1))


def test_spool_file_is_unlinked_and_closed(tmp_path):
    with WindowStream(3, spool_dir=tmp_path) as st:
        st.write(0, torch.ones(3, 4, 2))
        assert list(tmp_path.iterdir()) == []  # open but already unlinked
        fd = st._fd
        os.fstat(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the stream


def test_bad_writes_and_reads_raise():
    st = WindowStream(3)
    with pytest.raises(RuntimeError, match="nothing has been written"):
        st.read(0, 1)
    st.write(0, torch.ones(2, 4))
    with pytest.raises(ValueError, match="holds"):
        st.write(2, torch.ones(1, 5))
    with pytest.raises(ValueError, match="holds"):
        st.write(2, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(IndexError):
        st.write(2, torch.ones(2, 4))
    with pytest.raises(IndexError):
        st.read(3, 4)
