"""Median per-batch cost of DriftTracker.update vs recounting the whole window each batch.

Run: .venv/bin/python bench/drift_cost.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from sensor_predictor.drift import DriftTracker

N_CLUSTERS = 8
REFERENCE = [1.0 / N_CLUSTERS] * N_CLUSTERS
WINDOWS = (100, 10_000, 1_000_000)
BATCHES = (100, 1000)
REPEATS = 300

Labels = npt.NDArray[np.intp]


class RecountBaseline(DriftTracker):
    """Identical tracker except that counts are recomputed over the whole window each batch."""

    def _push(self, labels: Labels) -> None:
        w = self.window
        labels = labels[-w:]
        idx = (self._pos + np.arange(labels.size)) % w
        self._buf[idx] = labels
        self._pos = (self._pos + labels.size) % w
        self._fill = min(w, self._fill + labels.size)
        self._counts = np.bincount(self._buf[: self._fill], minlength=self.n_clusters)


def median_cost(update: Callable[[Labels], object], batches: list[Labels]) -> float:
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        update(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"n_clusters={N_CLUSTERS}, {REPEATS} timed batches per cell, window pre-filled")
    print(
        f"{'window':>10} {'batch':>6} {'tracker us':>11} {'recount us':>11} {'recount/tracker':>16}"
    )
    for window in WINDOWS:
        prefill = rng.integers(0, N_CLUSTERS, size=window, dtype=np.intp)
        for batch in BATCHES:
            batches = [
                rng.integers(0, N_CLUSTERS, size=batch, dtype=np.intp) for _ in range(REPEATS)
            ]
            tracker = DriftTracker(
                N_CLUSTERS, window, threshold=0.2, exit_threshold=0.1, reference=REFERENCE
            )
            tracker.update(prefill)
            baseline = RecountBaseline(
                N_CLUSTERS, window, threshold=0.2, exit_threshold=0.1, reference=REFERENCE
            )
            baseline.update(prefill)
            median_cost(tracker.update, batches[:20])  # warm-up
            # Alternate halves so both see the same machine conditions.
            half = REPEATS // 2
            t_tracker = median_cost(tracker.update, batches[:half])
            t_base = median_cost(baseline.update, batches[:half])
            t_tracker = min(t_tracker, median_cost(tracker.update, batches[half:]))
            t_base = min(t_base, median_cost(baseline.update, batches[half:]))
            print(
                f"{window:>10} {batch:>6} {t_tracker * 1e6:>11.1f} {t_base * 1e6:>11.1f}"
                f" {t_base / t_tracker:>15.1f}x"
            )


if __name__ == "__main__":
    main()
