"""Is there a CUDA device? Answered without importing torch where no NVIDIA driver is present, so
a CPU machine serving llama.cpp models never loads torch (~0.4 GB resident) to learn there is none."""

from __future__ import annotations

import functools
import os


@functools.cache
def cuda_available() -> bool:
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")
            or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


__all__ = ["cuda_available"]
