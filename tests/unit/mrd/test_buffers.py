"""BufferPool: a buffer is handed out again only when nothing made from it is alive."""

from __future__ import annotations

import numpy as np
import torch

from recon_server.mrd.buffers import BufferPool

SHAPE = (2, 3, 4, 8)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_a_free_buffer_is_reused_zeroed() -> None:
    pool = BufferPool()
    a = pool.zeros(SHAPE)
    a[...] = 1 + 2j
    where = _address(a)
    del a
    b = pool.zeros(SHAPE)
    assert _address(b) == where and b.dtype == np.complex64 and b.shape == SHAPE
    assert not b.any()


def test_a_buffer_with_a_live_view_or_tensor_is_not_reused() -> None:
    pool = BufferPool()
    a = pool.zeros(SHAPE)
    view = a[:, :, 1:3]  # like a scan's calibration rows
    tensor = torch.from_numpy(a[0])  # like the reconstruction's input
    where = _address(a)
    del a
    b = pool.zeros(SHAPE)
    assert _address(b) != where
    view[...] = 5  # still its own memory: the new buffer is untouched
    assert not b.any()
    del view
    c = pool.zeros(SHAPE)
    assert _address(c) != where  # the tensor still holds it
    del tensor
    d = pool.zeros(SHAPE)
    assert _address(d) == where and not d.any()


def test_other_sizes_and_dtypes_share_a_block_by_bytes_only() -> None:
    pool = BufferPool()
    a = pool.zeros((4, 8), np.complex64)
    where = _address(a)
    del a
    assert _address(pool.zeros((8, 8), np.float32)) == where  # same bytes: reused
    assert _address(pool.zeros((5, 8), np.complex64)) != where


def test_the_pool_stays_within_its_budget_dropping_free_buffers_first() -> None:
    pool = BufferPool(max_bytes=3 * 64 * 8)
    kept = [pool.zeros((64,)) for _ in range(3)]
    assert pool.pooled_bytes == 3 * 64 * 8
    extra = pool.zeros((64,))  # over budget with all three in use: not pooled
    assert pool.pooled_bytes == 3 * 64 * 8 and not extra.any()
    del kept[0]
    bigger = pool.zeros((128,))  # drops the free one, still does not fit beside the two in use
    assert pool.pooled_bytes == 2 * 64 * 8 and bigger.shape == (128,)
