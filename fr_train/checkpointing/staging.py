"""Reusable host staging buffers: where an asynchronous save copies the state it writes (issue 13).

A save used to copy every tensor into fresh host memory: a device→host copy into pageable memory
(≈ 1.4 GB/s on an H100 host, 5.97 s for 8.1 GiB) and, on the CPU, page faults on memory the
allocator had just handed back to the OS. ``HostStaging`` keeps one host buffer per tensor path of
the checkpoint (``rank 0 payload['payload']['head']['rows']['weight']`` …) and copies into it again
at the next save, once the previous write has finished (``CheckpointManager.save_async`` waits for
it before staging); a buffer is reallocated only when its tensor's shape, strides or dtype change,
and dropped when its path is no longer saved.

Buffers for device tensors are page-locked when the owner says so (``pin_memory=True``: the
trainer, from the device it trains on; the choice is the caller's, so the CPU tests run the same
code): their copies are issued ``non_blocking`` and the staging pass ends with one synchronisation
per device, so the writer thread never sees a half-copied tensor. They are page-locked at their
exact size (``cudaHostRegister`` on plain host memory, undone when the buffer is dropped), not
taken from PyTorch's pinned allocator, which rounds every block up to a power of two: a 10.24 GB
weight would hold 16 GiB of page-locked memory. Copies from CPU tensors are a
``copy_`` into the reused (never pinned) buffer, on one thread below 64 MiB (``_PARALLEL_COPY_BYTES``).

Memory: the buffers stay allocated between saves: the size of one checkpoint per rank of host
memory (pinned, with ``pin_memory``: memory the OS cannot page out), instead of a transient copy
per save. :meth:`HostStaging.release` (``CheckpointManager.close``) frees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_PARALLEL_COPY_BYTES = 64 << 20
"""A host→host copy smaller than this runs on the calling thread alone. Each copy that goes parallel
wakes torch's intra-op thread team; with hundreds of small tensors (a backbone and its optimizer
state: 713 for r50) on a host whose cores are busy (data loading, the other ranks), those wake-ups,
not the bytes, made the stall: 0.78 s for r50's 333 MiB with 2 threads on a loaded 2-core VM, 0.024 s
on one. Larger copies keep the thread team: memory bandwidth is then what counts."""


@dataclass
class _Buffer:
    tensor: torch.Tensor
    pinned: bool
    registered: bool = False  # page-locked with cudaHostRegister: unregistered when dropped
    used: bool = True


def _page_locked(shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> _Buffer:
    """A host buffer page-locked at its exact size (module docstring). Falls back to PyTorch's
    pinned allocator where this torch's ``cudart`` has no ``cudaHostRegister``."""
    cudart = torch.cuda.cudart()
    if not hasattr(cudart, "cudaHostRegister"):
        return _Buffer(torch.empty_strided(shape, stride, dtype=dtype, device="cpu", pin_memory=True), pinned=True)
    t = torch.empty_strided(shape, stride, dtype=dtype, device="cpu")
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return _Buffer(t, pinned=True)
    err = cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
    if int(err) != 0:  # cudaSuccess
        raise RuntimeError(f"checkpoint staging: page-locking {storage.nbytes() / 2**30:.2f} GiB of host memory failed "
                           f"({err}); the host may limit locked memory (ulimit -l, or too little RAM): set "
                           "checkpoint.pin_host_memory=false to stage in pageable memory")
    return _Buffer(t, pinned=True, registered=True)


def _unlock(b: _Buffer) -> None:
    if b.registered:
        torch.cuda.cudart().cudaHostUnregister(b.tensor.untyped_storage().data_ptr())
        b.registered = False


class HostStaging:
    """One reusable host buffer per tensor path; see the module docstring.

    A staging pass: ``with staging.copying():`` :meth:`copy` for every tensor, which returns the
    buffer that holds the tensor's value once the block has exited: the exit waits for the
    device→host copies and, when the block completed, drops the buffers of paths it did not copy.
    A buffer is overwritten by the next pass: the caller must be done with the previous pass's
    buffers (the checkpoint manager waits for the previous write) before it begins one.
    """

    def __init__(self, *, pin_memory: bool) -> None:
        self.pin_memory = pin_memory
        self._buffers: dict[str, _Buffer] = {}
        self._devices: set[torch.device] = set()
        self.allocated_bytes = 0
        """Bytes of buffers the last pass had to (re)allocate: 0 in a steady state."""

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold between saves."""
        return sum(b.tensor.untyped_storage().nbytes() for b in self._buffers.values())

    def buffer(self, path: str) -> torch.Tensor | None:
        """The buffer of ``path`` (None if it has none): for tests and diagnostics."""
        b = self._buffers.get(path)
        return None if b is None else b.tensor

    @contextlib.contextmanager
    def copying(self) -> Iterator[None]:
        for b in self._buffers.values():
            b.used = False
        self._devices.clear()
        self.allocated_bytes = 0
        try:
            yield
        finally:
            self._synchronize()  # also on an error: no copy may still be landing in a buffer
        # A pass cut short (a payload refused half-way) keeps the buffers it did not reach.
        for path in [p for p, b in self._buffers.items() if not b.used]:
            _unlock(self._buffers.pop(path))

    def copy(self, path: str, src: torch.Tensor) -> torch.Tensor:
        """Copy ``src`` (a dense tensor on any device) into the host buffer of ``path`` (inside
        :meth:`copying`)."""
        src = src.detach()
        on_device = src.device.type != "cpu"
        pinned = self.pin_memory and on_device
        # The strides clone() would give (src's own when it is dense, else contiguous), so the file
        # is the one a fresh copy would write; computed on the meta device: no allocation.
        stride = torch.empty_like(src, device="meta").stride()
        b = self._buffers.get(path)
        if (b is None or b.pinned != pinned or b.tensor.dtype != src.dtype or b.tensor.shape != src.shape
                or b.tensor.stride() != stride):
            old = self._buffers.pop(path, None)  # the old buffer's memory is free before the new one is taken
            if old is not None:
                _unlock(old)
                del old
            b = (_page_locked(src.shape, stride, src.dtype) if pinned
                 else _Buffer(torch.empty_strided(src.shape, stride, dtype=src.dtype, device="cpu"), pinned=False))
            self._buffers[path] = b
            self.allocated_bytes += b.tensor.untyped_storage().nbytes()
        b.used = True
        non_blocking = pinned and src.device.type == "cuda"
        threads = torch.get_num_threads()
        if on_device or threads == 1 or src.nbytes >= _PARALLEL_COPY_BYTES:
            b.tensor.copy_(src, non_blocking=non_blocking)
        else:
            torch.set_num_threads(1)
            try:
                b.tensor.copy_(src)
            finally:
                torch.set_num_threads(threads)
        if non_blocking:
            self._devices.add(src.device)
        return b.tensor

    def _synchronize(self) -> None:
        """One synchronisation per device that has copies in flight."""
        for device in self._devices:
            # The copies ran on the device's current stream (as the blocking .to("cpu") copies did).
            torch.cuda.current_stream(device).synchronize()
        self._devices.clear()

    def release(self) -> None:
        """Free every buffer (and, for pinned ones, hand the page-locked memory back to the OS)."""
        pinned = any(b.pinned for b in self._buffers.values())
        for b in self._buffers.values():
            _unlock(b)
        self._buffers.clear()
        self._devices.clear()
        if pinned:
            # PyTorch's caching host allocator keeps freed pinned blocks for reuse until told otherwise
            # (torch.accelerator.empty_host_cache in recent torch; an older one has only the private call, or none).
            empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or \
                getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()
