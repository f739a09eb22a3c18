"""What a benchmark ran on: its figures depend on it, and on what else the machine was doing."""

import os
import platform

import torch


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other work on the machine shows in the timings: the load says how much there was.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
