"""This process's resident memory, from /proc/self/status (Linux), for the benchmarks."""

from __future__ import annotations


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_rss_mb() -> float:
    """The peak resident memory (VmHWM) since the process started or the last reset."""
    return _status_mb("VmHWM")


def reset_peak_rss_mb() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")
