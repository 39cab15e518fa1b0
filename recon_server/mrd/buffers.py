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
        for i in range(len(self._blocks)):  # (enumerate would hold one more reference)
            block = self._blocks[i]
            # Referenced by the list, this variable and getrefcount's argument only: no array
            # or tensor made from it is alive (numpy views refer to the block itself).
            if block.nbytes == nbytes and sys.getrefcount(block) == 3:
                self._blocks.append(self._blocks.pop(i))  # most recently used last
                return block
        return None

    def _keep(self, block: np.ndarray) -> None:
        """Pool ``block`` if it fits, dropping the least recently used free buffers to make room."""
        total = sum(b.nbytes for b in self._blocks)
        i = 0
        while total + block.nbytes > self.max_bytes and i < len(self._blocks):
            if sys.getrefcount(self._blocks[i]) == 2:  # the list and the argument: free
                total -= self._blocks.pop(i).nbytes
            else:
                i += 1
        if total + block.nbytes <= self.max_bytes:
            self._blocks.append(block)


#: The process's pool (the assembler's k-space stores and staging buffers).
POOL = BufferPool()
