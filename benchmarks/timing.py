"""Interleaved timing: every variant is measured in the same run, round-robin per repeat, after a warm-up.

Interleaving spreads slow drifts of the machine (turbo, a neighbour job, thermal) over all variants alike,
so ratios between rows of one run are fair even when absolute figures wander.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TimingStats:
    """Wall-clock statistics of one callable, in milliseconds per call."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: list[float] | np.ndarray) -> TimingStats:
        s = np.asarray(samples_ms, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no timing samples")
        return cls(
            median_ms=float(np.median(s)),
            p90_ms=float(np.percentile(s, 90)),
            p99_ms=float(np.percentile(s, 99)),
            mean_ms=float(s.mean()),
            min_ms=float(s.min()),
            repeats=int(s.size),
        )


def measure_interleaved(
    calls: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    time_budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, TimingStats]:
    """Time each callable `repeats` times, round-robin, after `warmup` untimed rounds.

    The start of each round rotates so that no variant always runs right after the same neighbour.
    With `time_budget_s`, rounds stop early once the budget is spent (at least 3 timed rounds are kept).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = clock()
    for round_index in range(max(repeats, 1)):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            calls[name]()
            samples[name].append((clock() - t0) * 1000.0)
        if time_budget_s is not None and round_index >= 2 and clock() - started > time_budget_s:
            break
    return {name: TimingStats.from_samples(s) for name, s in samples.items()}
