"""The machine a measurement ran on: results are only comparable on the same machine, so every file of figures the
library or its benchmarks write says which (CPU, cores, library versions, the GPU when there is one, the load)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

__all__ = ["cpu_name", "load_average", "machine"]


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (above the core count: other jobs shared the machine), None where the
    platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device | str = "cpu", packages: tuple[str, ...] = ()) -> dict:
    """CPU, the instruction set torch's CPU kernels use (e.g. AVX2, AVX512: the same CPU name can run at very
    different speeds), cores, torch threads, the versions of torch, transformers and `packages`, the GPU when
    `device` is one, and the load average now.

    Example:
        >>> machine()["device"]
        'cpu'
    """
    device = torch.device(device)
    info = dict(
        cpu=cpu_name(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=_version("transformers"),
        python=platform.python_version(),
        device=str(device),
        load_average_start=load_average(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in packages:
        info[name] = _version(name)
    return info
