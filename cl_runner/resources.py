"""What learning a task costs: parameters trained, bytes stored, peak memory, seconds.

Peak memory is the process's peak resident set size on CPU (``VmHWM``, reset before each task
through ``/proc/self/clear_refs`` where Linux allows it, so each task gets its own peak) and
the peak of ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB; the peak of the whole process


class PeakMemory:
    """``with PeakMemory(device) as peak:`` ... ``peak.bytes`` and ``peak.kind`` afterwards."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_cpu_peak():
            self.kind = "cpu_peak_rss_since_start"
        return self

    def __exit__(self, *exc_info) -> None:
        self.bytes = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _cpu_peak_bytes()


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def parameter_count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def resource_summary(train_stats: list[dict]) -> dict:
    """The per-run figures of the comparison tables, from each task's training stats."""
    def values(key):
        return [s[key] for s in train_stats if s.get(key) is not None]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "trainable_parameters": max(values("trainable_parameters"), default=None),
        "bytes_per_task": mean(values("checkpoint_bytes")),
        "peak_memory_bytes": max(values("peak_memory_bytes"), default=None),
        "seconds_per_task": mean(values("seconds")),
    }
