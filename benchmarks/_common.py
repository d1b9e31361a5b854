"""What every benchmark records about the machine it ran on (results are only comparable on the same machine)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine(device: torch.device | str = "cpu", packages: tuple[str, ...] = ()) -> dict:
    """CPU, cores, torch threads, library versions, the GPU when there is one, and the load average at the start."""
    device = torch.device(device)
    info = dict(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=dist_version("transformers"),
        python=platform.python_version(),
        device=str(device),
        load_average_start=load_average(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in packages:
        info[name] = dist_version(name)
    return info
