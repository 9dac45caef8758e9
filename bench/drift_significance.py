"""False alarms and detection delay of the drift rule, with and without DRIFT_P_VALUE.

Labels are simulated with numpy (no database): a stationary stream drawn from the reference
proportions, fed to the real DriftTracker in batches, counts the drift events opened by chance;
a step shift counts the readings from the shift to the event.

Run: uv run python bench/drift_significance.py [--readings 10000000] [--trials 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sensor_predictor.drift import DriftTracker, js_divergence

THRESHOLD, EXIT = 0.1, 0.075
P_VALUE = 0.001
WINDOWS = (50, 100, 1000)
BATCH = 50


def references() -> dict[str, np.ndarray]:
    geometric = np.geomspace(1, 0.05, 12)
    return {"4 clusters (0.4/0.3/0.2/0.1)": np.array([0.4, 0.3, 0.2, 0.1]),
            "12 clusters (geometric, rarest 1.1%)": geometric / geometric.sum()}


def false_alarms(reference: np.ndarray, window: int, p_value: float, readings: int,
                 seed: int) -> tuple[int, float]:
    """Events opened, and the share of batches spent in an excursion."""
    rng = np.random.default_rng(seed)
    k = reference.size
    tracker = DriftTracker(k, window, THRESHOLD, EXIT, reference=reference.tolist(),
                           p_value=p_value)
    opened = in_excursion = batches = 0
    chunk = 1_000_000
    for start in range(0, readings, chunk):
        labels = rng.choice(k, size=min(chunk, readings - start), p=reference)
        for i in range(0, labels.size, BATCH):
            u = tracker.update(labels[i:i + BATCH])
            opened += u.event == "started"
            in_excursion += tracker.in_excursion
            batches += 1
    return opened, in_excursion / batches


def shifted(reference: np.ndarray, js_target: float) -> np.ndarray:
    """A mixture towards the reversed proportions whose JS divergence from the reference is
    js_target (bisection)."""
    far = reference[::-1].copy()
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if js_divergence(reference, (1 - mid) * reference + mid * far) < js_target:
            lo = mid
        else:
            hi = mid
    return (1 - hi) * reference + hi * far


def detection_delay(reference: np.ndarray, after: np.ndarray, window: int, p_value: float,
                    trials: int, seed: int) -> tuple[float, float, float]:
    """Median and 90th percentile readings from the shift to the event; share never detected
    within 5 windows."""
    rng = np.random.default_rng(seed)
    k = reference.size
    delays, missed = [], 0
    batch = min(BATCH, window)
    for _ in range(trials):
        tracker = DriftTracker(k, window, THRESHOLD, EXIT, reference=reference.tolist(),
                               p_value=p_value)
        tracker.update(rng.choice(k, size=window, p=reference))
        if tracker.in_excursion:
            continue  # a false alarm before the shift: not a detection
        seen = 0
        while seen < 5 * window:
            seen += batch
            if tracker.update(rng.choice(k, size=batch, p=after)).event == "started":
                delays.append(seen)
                break
        else:
            missed += 1
    arr = np.asarray(delays or [np.nan], dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 90)), missed / trials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=10_000_000)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--shift", type=float, default=0.15,
                        help="JS divergence of the shifted stream from the reference (0.15)")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"false alarms over {args.readings:,} stationary readings, batches of {BATCH}, "
          f"DRIFT_THRESHOLD={THRESHOLD}")
    print(f"{'reference':38} {'window':>6}  {'JS only':>18}  {'JS and p<' + str(P_VALUE):>18}")
    for name, ref in references().items():
        for w in WINDOWS:
            cells = []
            for p in (1.0, P_VALUE):
                opened, _share = false_alarms(ref, w, p, args.readings, seed=w)
                cells.append(f"{opened:>6} ({opened / args.readings * 1e6:6.2f}/1M)")
            print(f"{name:38} {w:>6}  {cells[0]:>18}  {cells[1]:>18}")
    print(f"\ndetection delay after a step shift to JS={args.shift} (readings from the shift "
          f"to the event: median / p90, share missed within 5 windows; {args.trials} trials)")
    for name, ref in references().items():
        after = shifted(ref, args.shift)
        for w in WINDOWS:
            cells = []
            for p in (1.0, P_VALUE):
                med, p90, missed = detection_delay(ref, after, w, p, args.trials, seed=w + 1)
                cells.append(f"{med:6.0f} / {p90:6.0f}  missed {missed:4.0%}")
            print(f"{name:38} {w:>6}  {cells[0]}  |  {cells[1]}")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
