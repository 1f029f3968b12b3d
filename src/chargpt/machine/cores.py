"""How many CPU threads a kind of work gets: the cores that are free now, not every core the machine has.

A PyTorch parallel region waits for its slowest thread, and a thread whose core is shared with another busy
process is the slowest by far (docs/benchmarks.md: bench_contention). So the threads are chosen from the
cores that are actually free, measured over a moment from /proc/stat (all CPU time spent, less this
process's own), and a training run re-checks as it goes (`ThreadTuner`): when its steps get much slower it
tries one thread fewer and keeps what is faster. An explicit count (`--threads N`) is used as given, bounded
by the cores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from statistics import median

SAMPLE_SECONDS = 0.25  # how long free_cores() watches the machine


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _busy_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, int(own[11]) + int(own[12])  # user..steal busy; this process's utime + stime


def others_busy(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes kept busy over the next `seconds` (None where it cannot be measured)."""
    first = _busy_ticks()
    if first is None:
        return None
    time.sleep(seconds)
    second = _busy_ticks()
    if second is None:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (second[0] - first[0]) - (second[1] - first[1])
    return max(0.0, others / ticks / seconds)


def free_cores(total: int | None = None, busy: float | None = None) -> int:
    """Cores not kept busy by other processes (at least 1). `busy`: measured now when not given; where nothing
    can be measured, the 1-minute load average stands in."""
    total = cores() if total is None else total
    if busy is None:
        busy = others_busy()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(total, int(total - busy + 0.5)))


def choose_threads(requested: int | None, total: int | None = None, free: int | None = None, share: int = 1) -> int:
    """Threads for one process: `requested` as given (at most the cores), else the free cores split among
    `share` processes on this machine (DDP ranks)."""
    total = cores() if total is None else total
    if requested is not None:
        return max(1, min(requested, total))
    free = free_cores(total) if free is None else free
    return max(1, free // max(1, share))


def why(requested: int | None, threads: int, total: int) -> str:
    """The announcement's phrase for the choice."""
    count = f"{threads} thread{'s' if threads > 1 else ''}"
    if requested is not None:
        return f"{count} (asked for)"
    return f"{count} (free cores: {threads if threads < total else 'all'} of {total})"


@dataclass
class ThreadTuner:
    """Re-checks a training run's thread count from its step times: when the steps get `slower` x slower than
    the run's own baseline (another process took a core), it tries one thread fewer for `window` steps and keeps
    whichever was faster; every `retry` steps at a reduced count it tries the original count again (the other
    process may be gone). Pure bookkeeping: `step(seconds)` returns the thread count to use from now on."""

    threads: int
    window: int = 8
    slower: float = 1.5
    retry: int = 400
    initial: int = field(init=False)
    times: list[float] = field(default_factory=list)
    baseline: float | None = None
    trial: tuple[int, float] | None = None  # (the count before the trial, its median step time)
    since_change: int = 0
    changes: list[str] = field(default_factory=list)  # what was decided, for the run's log

    def __post_init__(self) -> None:
        self.initial = self.threads

    def step(self, seconds: float) -> int:
        self.times.append(seconds)
        self.since_change += 1
        if len(self.times) < self.window:
            return self.threads
        now = median(self.times[-self.window :])
        self.times.clear()
        if self.trial is not None:
            before, before_time = self.trial
            self.trial = None
            if now > before_time:  # the trial was slower: back
                self._set(before, f"kept {before} threads ({now * 1e3:.0f} ms a step with {self.threads})")
            self.baseline = min(now, before_time)
            return self.threads
        if self.baseline is None:
            self.baseline = now
        elif now > self.slower * self.baseline and self.threads > 1:
            self.trial = (self.threads, now)
            self._set(self.threads - 1, f"steps slowed {self.baseline * 1e3:.0f} -> {now * 1e3:.0f} ms")
        elif self.threads < self.initial and self.since_change >= self.retry:
            self.trial = (self.threads, now)
            self._set(self.initial, "trying all the threads again")
        else:
            self.baseline = min(self.baseline, now)
        return self.threads

    def _set(self, threads: int, reason: str) -> None:
        self.changes.append(f"{threads} thread{'s' if threads > 1 else ''}: {reason}")
        self.threads, self.since_change = threads, 0
