"""A process's memory, from Linux's /proc: what the memory benchmarks read."""

from __future__ import annotations


def status(key: str, pid: int | str = "self") -> int:
    """The KEY line (VmRSS: the size now, VmHWM: the peak) of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def restart_peak(pid: int | str = "self") -> None:
    """Start the process's peak (VmHWM) again from its current size."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
