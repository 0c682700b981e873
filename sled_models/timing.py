"""The one timing helper of the benches and the model builder's evaluation (``bench/fleet.py``, ``bench/run.py``,
``bench/gpu_server.py``, ``sled_models.evaluate``): each says which clock and which statistic it reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], *, repeat: int = 5, warm_up: bool = True,
          clock: Callable[[], float] = time.perf_counter, statistic: Callable[[list[float]], float] = statistics.median,
          sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes: ``statistic`` of ``repeat`` timed calls (the median; ``min``: the least
    disturbed by whatever else the machine does) after one untimed call when ``warm_up``. ``clock``: wall time
    (``time.perf_counter``) or this process's CPU seconds (``time.process_time``). ``sync`` waits for work
    ``fn`` queued (a GPU's) inside each timed call."""
    if warm_up:
        fn()
        if sync is not None:
            sync()
    samples = []
    for _ in range(repeat):
        started = clock()
        fn()
        if sync is not None:
            sync()
        samples.append(clock() - started)
    return statistic(samples)
