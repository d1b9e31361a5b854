"""How much memory a forward pass kept for its backward may take, so that calibration stops with an error it can act
on (a smaller batch) instead of being killed by the out-of-memory killer.

A forward pass with gradients keeps, for the backward, tensors that autograd saves; on a large model and a long batch
they are most of the peak. [`saved_memory_limit`] counts them as they are saved (each storage once, the model's
parameters not at all) and raises [`OutOfCalibrationMemory`] the moment they pass a limit, before the machine runs
out. [`available_bytes`] is the memory the device has free now: `MemAvailable` on Linux CPUs, the free memory CUDA
reports on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["OutOfCalibrationMemory", "available_bytes", "saved_memory_limit"]


class OutOfCalibrationMemory(MemoryError):
    """The tensors a forward pass saved for its backward passed the limit: `saved` bytes (and counting) > `limit`."""

    def __init__(self, saved: int, limit: int):
        super().__init__(f"the forward pass had saved {_size(saved)} for its backward, over the {_size(limit)} "
                         "allowed")
        self.saved, self.limit = saved, limit


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on `device` now, or None where it cannot be known (no /proc/meminfo, another accelerator)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def saved_memory_limit(limit: int | None, model: Any) -> Iterator[None]:
    """Within the block, raise [`OutOfCalibrationMemory`] as soon as the tensors autograd saves for the backward
    (`model`'s parameters excluded, each storage counted once) exceed `limit` bytes; None: no limit."""
    if limit is None:
        yield
        return
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved += storage.nbytes()
            if saved > limit:
                raise OutOfCalibrationMemory(saved, limit)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
