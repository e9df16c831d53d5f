"""Peak memory of one piece of work, measured in a fresh process so that nothing else's allocations count.

:func:`run_in_subprocess` calls ``module:function(**arguments)`` in a new Python (glibc's mmap threshold fixed, so
that freed large blocks go back to the OS and RSS follows the live tensors) and returns what it returned (JSON).
Inside, :func:`peak_above` measures the resident-set high-water mark of a call above what was resident before it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

_CHILD = (
    "import importlib, json, sys; module, name = sys.argv[1].split(':'); "
    "print(json.dumps(getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))))"
)


def run_in_subprocess(function: str, arguments: dict[str, Any]) -> Any:
    """``function`` ("package.module:name") called with ``arguments`` in a fresh process; its JSON-able result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, function, json.dumps(arguments)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory worker {function} failed (exit {result.returncode}): {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_above(work: Callable[[], Any]) -> float:
    """MiB: the resident-set high-water mark during ``work()`` above the resident set before it (CPU, Linux; where
    the high-water mark cannot be reset, above the mark so far)."""
    base = proc_status_mib("VmRSS") if reset_peak_rss() else None
    base = peak_rss_mib() if base is None else base
    work()
    return peak_rss_mib() - base


def proc_status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` field in MiB (e.g. ``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    hwm = proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
