"""Data-parallel calibration through accelerate: shard the windows, reduce the statistics, fail together.

Under `accelerate launch` (or any `torch.distributed` launcher accelerate understands) every process measures its
share of the calibration windows; the distortion tables and validation KL sums are summed across processes, so every
process ends with the same config as a single-process run on the same data (up to the order of float additions).
Errors are exchanged before every collective, so a failure on one process is raised on all of them instead of leaving
the others waiting in a collective forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["Processes"]

T = TypeVar("T")


def _launched() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Processes:
    """The processes taking part in calibration: one (no launcher) or all of an accelerate launch."""

    def __init__(self):
        self.state = None
        if _launched():
            from accelerate import PartialState

            # Without an accelerator, accelerate only forms a process group when told the processes run on CPU.
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def count(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def index(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, windows: torch.Tensor, what: str) -> torch.Tensor:
        """This process's contiguous share of `windows` (every process gets at least one)."""
        if len(windows) and len(windows) < self.count:
            raise ValueError(f"{len(windows)} {what} windows cannot be shared by {self.count} processes: use at least "
                             "one window per process.")
        return torch.tensor_split(windows, self.count)[self.index] if self.count > 1 else windows

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` here; if it fails on any process, raise on every process (no collective is left waiting)."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every process
            error = e
        if self.count > 1:
            from accelerate.utils import gather_object

            failures = [f for f in gather_object([None if error is None else f"{type(error).__name__}: {error}"]) if f]
            if failures and error is None:
                raise RuntimeError(f"{what} failed on another process: {failures[0]}")
        if error is not None:
            raise error
        return result

    def agree(self, value: Any, what: str) -> None:
        """Raise on every process unless all processes hold the same `value` (model, data, settings)."""
        if self.count == 1:
            return
        from accelerate.utils import gather_object

        values = gather_object([value])
        if any(v != values[0] for v in values):
            details = "; ".join(f"process {i}: {v}" for i, v in enumerate(values))
            raise ValueError(f"The processes disagree on the {what} ({details}). Launch every process with the same "
                             "model, data and calibration settings.")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (on the collective's device, returned on `tensor`'s)."""
        if self.count == 1:
            return tensor
        from accelerate.utils import reduce

        device = self.state.device if self.state.backend == "nccl" else torch.device("cpu")
        return reduce(tensor.to(device), reduction="sum").to(tensor.device)
