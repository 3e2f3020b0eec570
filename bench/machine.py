"""One line naming the machine a benchmark ran on, for its JSON (numbers differ across CPUs)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """'x86_64, 2 cores, <CPU model>'."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{platform.machine()}, {os.cpu_count()} cores, {model}"
