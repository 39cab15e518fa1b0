"""Zeroed arrays for streamed scans, reused once nothing refers to them any more.

The first write to a fresh array costs a page fault per page. On virtual machines that hand
freed memory back to the host (virtio-balloon free page reporting, as on the build machine) a
fault can cost tens of microseconds: filling a fresh 67 MB k-space store took up to 0.25 s
there, against 0.012 s for a reused one. Scans of one protocol arrive one after another with the
same matrix, so :data:`POOL` keeps their buffers and hands a buffer out again once every array
and tensor made from it (views included) is gone.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["POOL", "BufferPool"]


class BufferPool:
    """Keeps up to ``max_bytes`` of buffers; :meth:`zeros` reuses a free one of the right size."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._blocks: list[np.ndarray] = []  # flat uint8; every array handed out is a view of one
        self._lock = threading.Lock()

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype | type = np.complex64) -> np.ndarray:
        """A zeroed C-contiguous array; a pooled buffer when one of its size is free."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            block = self._free_block(nbytes)
            reused = block is not None
            if block is None:
                block = np.zeros(nbytes, np.uint8)  # fresh pages are zero already
                self._keep(block)
            out = block.view(dtype).reshape(shape)  # the view holds the block: it is in use now
        if reused:
            out.fill(0)
        return out

    @property
    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._blocks)

    def _free_block(self, nbytes: int) -> np.ndarray | None:
        for i in range(len(self._blocks)):
            if self._blocks[i].nbytes == nbytes and _unused(self._blocks, i):
                block = self._blocks.pop(i)
                self._blocks.append(block)  # most recently used last
                return block
        return None

    def _keep(self, block: np.ndarray) -> None:
        """Pool ``block`` if it fits, dropping the least recently used free buffers to make room."""
        total = sum(b.nbytes for b in self._blocks)
        i = 0
        while total + block.nbytes > self.max_bytes and i < len(self._blocks):
            if _unused(self._blocks, i):
                total -= self._blocks.pop(i).nbytes
            else:
                i += 1
        if total + block.nbytes <= self.max_bytes:
            self._blocks.append(block)


def _refcount_at(blocks: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(blocks[i])


# What this interpreter counts for a block held by the pool's list alone (how getrefcount counts
# its own argument differs between Python versions, so it is measured, not assumed).
_UNUSED_REFS = _refcount_at([np.zeros(1, np.uint8)], 0)


def _unused(blocks: list[np.ndarray], i: int) -> bool:
    """True when nothing but ``blocks`` refers to ``blocks[i]``: no array or tensor made from it
    is alive (numpy views, and tensors through them, refer to the block itself)."""
    return _refcount_at(blocks, i) == _UNUSED_REFS


#: The process's pool (the assembler's k-space stores and staging buffers).
POOL = BufferPool()
