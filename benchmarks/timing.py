"""Timing statistics of a list of per-call samples (facemark.benchmarks.isolated collects the samples)."""

from __future__ import annotations

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
