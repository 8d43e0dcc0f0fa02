"""Interleaved timing for the benchmarks: configurations run in rounds (A B C A B C ...),
so a load swing on a shared machine hits every configuration of a round alike, and ratios
are taken within a round before their median is.

CPU time (`time.process_time`, this process's threads only) is what the step costs; wall
time also contains the time the process waited for a core. Their ratio per round is
reported as the process's share of a core, the honest measure of how loaded the machine was.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Samples:
    cpu: List[float] = field(default_factory=list)
    wall: List[float] = field(default_factory=list)


def quartiles(values: List[float]) -> tuple:
    """(q1, median, q3) of a list (q1 = q3 = median for one value)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


def fmt(values: List[float], scale: float = 1.0, digits: int = 1) -> str:
    """'median [q1-q3]' of values * scale."""
    q1, med, q3 = quartiles([v * scale for v in values])
    return f"{med:.{digits}f} [{q1:.{digits}f}-{q3:.{digits}f}]"


def run_rounds(
    steps: Dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
    per_round: Optional[Callable[[], float]] = None,
) -> tuple:
    """Runs every step once per round, `warmup` untimed rounds first. Returns
    ({name: Samples}, [per_round() value of each timed round])."""
    samples = {name: Samples() for name in steps}
    probes: List[float] = []
    for r in range(warmup + rounds):
        if r >= warmup and per_round is not None:
            probes.append(per_round())
        for name, step in steps.items():
            sync()
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            sync()
            c1, w1 = time.process_time(), time.perf_counter()
            if r >= warmup:
                samples[name].cpu.append(c1 - c0)
                samples[name].wall.append(w1 - w0)
    return samples, probes


def within_round_ratios(a: List[float], b: List[float]) -> List[float]:
    return [x / y for x, y in zip(a, b)]


def load_line(samples: Dict[str, Samples]) -> str:
    """The machine's load average and this process's median share of a core while timed."""
    shares = [c / w for s in samples.values() for c, w in zip(s.cpu, s.wall) if w > 0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores; "
            f"CPU time / wall time of the timed steps: median {statistics.median(shares):.2f} "
            f"(1.00 = the process never waited for a core)")
