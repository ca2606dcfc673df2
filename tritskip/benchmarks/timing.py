"""Timers and memory meters, one per device kind, with one interface.

- CPU: pytest-benchmark's :class:`~pytest_benchmark.fixture.BenchmarkFixture` (calibrated
  iterations per round, warmup, rounds for a time budget) and its
  :class:`~pytest_benchmark.stats.Stats`. Peak memory comes from the allocator events that
  ``torch.profiler`` records with ``profile_memory=True`` (per-op granularity).
- CUDA: ``triton.testing.do_bench`` (L2 flushed before every repetition, CUDA events), all
  repetitions kept; the caller rotates inputs so the working set exceeds L2 as well. Peak memory
  is ``torch.cuda.max_memory_allocated`` over one call, less what was allocated before it.

Every timer returns times in milliseconds as :class:`Timing` (min, median, max, IQR, count).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

__all__ = ["CpuTimer", "CudaTimer", "Timing", "make_timer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Summary of repeated measurements of one callable, in milliseconds."""

    min: float
    median: float
    max: float
    iqr: float
    rounds: int

    @classmethod
    def from_ms(cls, times_ms: list[float]) -> Timing:
        data = sorted(times_ms)
        if len(data) >= 4:
            q = statistics.quantiles(data, n=4)
            iqr = q[2] - q[0]
        else:
            iqr = 0.0
        return cls(data[0], statistics.median(data), data[-1], iqr, len(data))

    def as_dict(self) -> dict:
        return asdict(self)


class _QuietLogger:
    """The logger interface BenchmarkFixture expects, discarding everything."""

    def debug(self, *args, **kwargs) -> None:
        pass

    info = warning = error = debug


class CpuTimer:
    """Times CPU callables with pytest-benchmark's fixture and statistics.

    The number of iterations per round and of rounds is chosen from a short estimate so that a
    round lasts at least ``round_time`` and one measurement about ``max_time`` seconds (at
    least ``min_rounds``, at most ``max_rounds`` rounds), then handed to
    ``BenchmarkFixture.pedantic``. Fixing the counts up front keeps the cost of a measurement
    bounded on a busy machine, where pytest-benchmark's own calibration (from the fastest
    call) would ask for as many rounds as an idle machine needs.
    """

    device = "cpu"

    def __init__(self, max_time: float = 0.5, min_rounds: int = 5, max_rounds: int = 200,
                 round_time: float = 0.002) -> None:  # fmt: skip
        self.max_time = max_time
        self.min_rounds = min_rounds
        self.max_rounds = max_rounds
        self.round_time = round_time

    @staticmethod
    def _fixture(name: str):
        from pytest_benchmark.fixture import BenchmarkFixture
        from pytest_benchmark.timers import default_timer
        from pytest_benchmark.utils import NameWrapper

        node = SimpleNamespace(name=name, nodeid=name)
        return BenchmarkFixture(
            node, disable_gc=True, timer=NameWrapper(default_timer), min_rounds=1, min_time=0,
            max_time=0, precision=None, confidence=None, warmup=False, warmup_iterations=0,
            calibration_precision=10, add_stats=lambda stats: None, logger=_QuietLogger(),
            warner=None, disabled=False, cprofile=False, cprofile_loops=None, cprofile_dump=None,
        )  # fmt: skip

    def measure(self, fn: Callable[[], object], name: str = "bench") -> list[float]:
        """Per-iteration times in ms, one per round, of a pytest-benchmark run of ``fn``."""
        fn()
        estimate = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            estimate.append(time.perf_counter() - start)
        per_call = max(statistics.median(estimate), 1e-7)
        iterations = max(1, math.ceil(self.round_time / per_call))
        rounds = round(self.max_time / (iterations * per_call))
        rounds = max(self.min_rounds, min(self.max_rounds, rounds))
        fixture = self._fixture(name)
        fixture.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        meta = fixture.stats
        return [t * 1e3 / meta.iterations for t in meta.stats.data]

    def synchronize(self) -> None:
        pass

    def peak_memory(self, fn: Callable[[], object]) -> int:
        """Peak bytes allocated during one call of ``fn``, above what was live before it."""
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        # The profiler's C++ side prints start/stop notes and warns about frees of blocks
        # allocated before it started; neither is about the measurement.
        with _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        changes = []
        for event in prof.events():
            delta = event.self_cpu_memory_usage
            if delta > 0:
                changes.append((event.time_range.start, delta))
            elif delta < 0:
                changes.append((event.time_range.end, delta))
        live = peak = 0
        for _, delta in sorted(changes, key=lambda c: c[0]):
            live += delta
            peak = max(peak, live)
        return int(peak)


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Send file descriptor ``fd`` to /dev/null for the block (C++ prints bypass ``sys``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


class CudaTimer:
    """Times CUDA callables with ``triton.testing.do_bench`` and keeps every repetition."""

    device = "cuda"

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 100) -> None:
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def measure(self, fn: Callable[[], object], name: str = "bench") -> list[float]:
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all"))

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def peak_memory(self, fn: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)


def make_timer(device: str, quick: bool) -> CpuTimer | CudaTimer:
    if device == "cuda":
        return CudaTimer(warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    return CpuTimer(max_time=0.1 if quick else 0.4, min_rounds=5)


def wall(fn: Callable[[], object], timer: CpuTimer | CudaTimer) -> float:
    """Wall-clock seconds of one call of ``fn``, synchronized (compile and autotune costs)."""
    timer.synchronize()
    start = time.perf_counter()
    fn()
    timer.synchronize()
    return time.perf_counter() - start
