"""What every benchmark's JSON line says about the machine it ran on, so figures can be compared."""

from __future__ import annotations

import os
import platform
import sys


def machine() -> dict[str, object]:
    """CPU, cores, load at the end of the run, and the Python and torch versions."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch_version,
        "python": sys.version.split()[0],
    }
