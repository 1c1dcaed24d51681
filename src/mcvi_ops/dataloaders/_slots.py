"""Shared-memory slots that data-loader workers write crop batches into, reused batch after batch.

A tensor sent from a worker is copied into a new shared-memory segment and its file descriptor is
handed over a socket: about 6 ms of CPU time per 4 MB batch on a 2-core VM, half the cost of
decoding the batch. Here each worker owns a few slots of one shared block, allocated once before
the workers start; a worker writes a batch into a free slot and sends only the slot's number (and
the small fields). The main process copies the crops out (into page-locked memory when the loader
pins memory, in torch's pin-memory thread) and frees the slot.
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from typing import Any

import numpy as np
import torch

#: pools of this process, by id: batches arriving from workers find their pool here
_POOLS: weakref.WeakValueDictionary[str, SlotPool] = weakref.WeakValueDictionary()
_POLL_SECONDS = (1e-4, 2e-3)  # first and longest wait between checks for a free slot
#: a worker waiting this long for a free slot stops with an error instead of hanging
WAIT_TIMEOUT_SECONDS = 600.0


class SlotPool:
    """``n_slots`` batch buffers per worker in one shared-memory block, with busy flags."""

    def __init__(
        self,
        n_workers: int,
        n_slots: int,
        batch_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.owner_pid = os.getpid()
        self.data = torch.empty((n_workers, n_slots, *batch_shape), dtype=dtype).share_memory_()
        self.busy = torch.zeros((n_workers, n_slots), dtype=torch.int32).share_memory_()
        self._next = 0  # the next slot this (worker) process writes
        _POOLS[self.id] = self

    @property
    def n_workers(self) -> int:
        """Workers the pool has slots for."""
        return self.data.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {"id": self.id, "owner_pid": self.owner_pid, "data": self.data, "busy": self.busy}

    def __setstate__(self, state: dict[str, Any]) -> None:  # in spawned workers
        self.__dict__.update(state)
        self._next = 0

    def acquire(self, worker: int) -> int:
        """A free slot of ``worker`` (waiting for the main process to free one), marked busy."""
        busy = self.busy[worker].numpy()
        n_slots = len(busy)
        wait, waited = _POLL_SECONDS[0], 0.0
        while True:
            for step in range(n_slots):
                slot = (self._next + step) % n_slots
                if busy[slot] == 0:
                    busy[slot] = 1
                    self._next = (slot + 1) % n_slots
                    return slot
            if waited > WAIT_TIMEOUT_SECONDS:
                msg = (
                    f"Data-loader worker {worker} waited {waited:.0f} s for the main process to "
                    "take one of its batches. Iterate the CropDataLoader itself (not "
                    "`DataLoader.__iter__`), or use `num_workers=0`."
                )
                raise TimeoutError(msg)
            time.sleep(wait)
            waited += wait
            wait = min(2 * wait, _POLL_SECONDS[1])

    def release(self, worker: int, slot: int) -> None:
        """Free a slot (main process)."""
        self.busy[worker, slot] = 0


class SlotBatch:
    """A batch whose crops wait in slot ``slot`` of ``worker``; the other fields travel along.

    The main process turns it into a dict of tensors with :meth:`to_tensors` (or torch's
    pin-memory thread with :meth:`pin_memory`), which frees the slot; a batch dropped unread
    (e.g. when an epoch is cut short) frees it when it is garbage-collected.
    """

    def __init__(
        self,
        pool: SlotPool,
        worker: int,
        slot: int,
        n_rows: int,
        x_key: str,
        fields: dict[str, np.ndarray],
    ) -> None:
        self.pool_id = pool.id
        self.owner_pid = pool.owner_pid
        self.worker = worker
        self.slot = slot
        self.n_rows = n_rows
        self.x_key = x_key
        self.fields = fields
        self._released = False

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_released"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._released = False

    def _pool(self) -> SlotPool:
        pool = _POOLS.get(self.pool_id)
        if pool is None or os.getpid() != self.owner_pid:
            msg = "This batch's shared-memory slots belong to a loader of another process."
            raise RuntimeError(msg)
        return pool

    def to_tensors(self, *, pin: bool = False) -> dict[str, torch.Tensor]:
        """The batch as a dict of tensors (the crops copied out of the slot, which is freed)."""
        pool = self._pool()
        crops = pool.data[self.worker, self.slot, : self.n_rows]
        if pin:
            out = torch.empty_like(crops, pin_memory=True).copy_(crops)
        else:
            # numpy's copy reuses freed heap memory; a fresh torch tensor of a few MB page-faults
            # on every batch (10x slower here)
            out = torch.from_numpy(crops.numpy().copy())
        self.release()
        batch = {self.x_key: out}
        for key, values in self.fields.items():
            tensor = torch.from_numpy(values)
            batch[key] = tensor.pin_memory() if pin else tensor
        return batch

    def pin_memory(self, device: Any = None) -> dict[str, torch.Tensor]:
        """The batch in page-locked memory (called by torch's pin-memory thread)."""
        return self.to_tensors(pin=True)

    def release(self) -> None:
        """Free the slot (once; main process only)."""
        if not self._released and os.getpid() == self.owner_pid:
            pool = _POOLS.get(self.pool_id)
            if pool is not None:
                pool.release(self.worker, self.slot)
            self._released = True

    def __del__(self) -> None:
        try:
            self.release()
        except (AttributeError, TypeError):  # interpreter shutdown: module globals are gone
            pass
