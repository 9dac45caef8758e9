"""Per-feature drift, outlier share and the cluster rule, measured against issue 20's goals.

Pure simulation with numpy (no database, no worker): the real trackers of feature_drift.py and
drift.py, the real DriftMonitor for the cost. Two kinds of stream:

* iid: 20 independent Gaussian features, the reference their true mean and deviation;
* simulator: the project's simulated machines (generate_feature_matrix: AR(1) sensors, four
  operating profiles, failure episodes), a model fitted by `train`'s own fit_pipeline on 50,000
  readings (seed 1), streams from other seeds.

Run: uv run python bench/drift_attribution.py [--quick] > bench/results/drift_attribution.txt
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import structlog

from sensor_predictor.config import Settings
from sensor_predictor.drift import g_test_p_value, js_divergence
from sensor_predictor.feature_drift import (
    FALSE_ALARM_BUDGET,
    FeatureDriftTracker,
    FeatureReference,
    OutlierTracker,
    binomial_tail,
)

NAMES = tuple(f"Sensor {i}" for i in range(1, 21))
WINDOW = 100
EFFECT = 0.5  # FEATURE_DRIFT_THRESHOLD's default
SHARE = 0.05  # OUTLIER_SHARE_THRESHOLD's default
WORKER_US_PER_READING = 18.3  # docs/performance.md: worker CPU per reading, no shadow


def _first_open(tracker: FeatureDriftTracker | OutlierTracker, rows: np.ndarray,
                step: int) -> int | None:
    for i in range(0, rows.shape[0], step):
        state = tracker.update(rows[i:i + step])
        if state is not None and state.drifting:
            return i + step
    return None


def attribution_iid(trials: int, shift: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    ref = FeatureReference(NAMES, (0.0,) * 20, (1.0,) * 20)
    opened, first, delays, false_before = 0, 0, [], 0
    for _ in range(trials):
        tracker = FeatureDriftTracker(ref, WINDOW, EFFECT)
        if _first_open(tracker, rng.normal(size=(WINDOW, 20)), 10) is not None:
            false_before += 1
            continue
        sensor = int(rng.integers(20))
        rows = rng.normal(size=(WINDOW, 20))
        rows[:, sensor] += shift * rng.choice([-1.0, 1.0])
        at = _first_open(tracker, rows, 1)
        if at is not None:
            opened += 1
            delays.append(at)
            first += tracker.state().ranked[0].feature == NAMES[sensor]
    return (f"iid, {shift:g} sigma on one of 20 sensors, window {WINDOW}, {trials} trials: "
            f"opened within one window {opened / trials:.1%}, named first {first / trials:.1%}"
            f" (of opened {first / max(opened, 1):.1%}); readings to open median "
            f"{statistics.median(delays) if delays else float('nan'):g}, max "
            f"{max(delays) if delays else float('nan')}")


def _simulator_model() -> tuple[FeatureReference, object]:
    from sensor_predictor.kmeans_kernel import from_pipeline
    from sensor_predictor.simulator.generator import generate_feature_matrix
    from sensor_predictor.training import fit_pipeline

    fitted = fit_pipeline(generate_feature_matrix(50_000, seed=1), 4, seed=1)
    assert fitted.feature_reference is not None
    return FeatureReference.from_json(fitted.feature_reference), from_pipeline(fitted.pipeline)


def attribution_simulator(ref: FeatureReference, stream: np.ndarray, trials: int,
                          shifts: tuple[float, ...], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    std = np.asarray(ref.std)
    out = []
    for shift in shifts:
        opened = first = 0
        for _ in range(trials):
            start = int(rng.integers(0, stream.shape[0] - 3 * WINDOW))
            tracker = FeatureDriftTracker(ref, WINDOW, EFFECT)
            tracker.update(stream[start:start + WINDOW])
            sensor = int(rng.integers(20))
            rows = stream[start + WINDOW:start + 2 * WINDOW].copy()
            rows[:, sensor] += shift * std[sensor] * rng.choice([-1.0, 1.0])
            if _first_open(tracker, rows, 10) is not None:
                opened += 1
                first += tracker.state().ranked[0].feature == NAMES[sensor]
        out.append(f"simulator, {shift:g} sigma on one sensor, window {WINDOW}, {trials} trials:"
                   f" opened within one window {opened / trials:.1%}, named first "
                   f"{first / trials:.1%}")
    return out


def false_alarms_features(ref: FeatureReference, rows_of: object, readings: int,
                          chunk: int, label: str) -> str:
    """Every reading a check (a batch of one: the worst case), vectorised with cumulative sums:
    readings where some feature passes both rules, and the |z| tail against the normal's."""
    from scipy.special import ndtr

    mean, std = np.asarray(ref.mean), np.asarray(ref.std)
    infl = np.asarray(ref.inflation_at(WINDOW))
    alpha = FALSE_ALARM_BUDGET / len(ref.names)
    fires = checks = over4 = 0
    max_z = 0.0
    prev_tail = None
    done = 0
    while done < readings:
        rows = rows_of(min(chunk, readings - done), done)  # type: ignore[operator]
        if prev_tail is not None:
            rows = np.vstack([prev_tail, rows])
        c = np.cumsum(rows, axis=0)
        sums = c[WINDOW - 1:].copy()
        sums[1:] -= c[:-WINDOW]
        effect = (sums / WINDOW - mean) / std
        z = effect * np.sqrt(WINDOW / infl)
        p = 2 * ndtr(-np.abs(z))
        fires += int(np.any((np.abs(effect) > EFFECT) & (p < alpha), axis=1).sum())
        over4 += int((np.abs(z) > 4).sum())
        max_z = max(max_z, float(np.abs(z).max()))
        checks += z.shape[0]
        done += rows.shape[0] - (0 if prev_tail is None else prev_tail.shape[0])
        prev_tail = rows[-(WINDOW - 1):]
    expected4 = 2 * float(ndtr(-4.0)) * checks * len(ref.names)
    return (f"{label}: {readings:,} readings, {checks:,} checks (one per reading): "
            f"{fires} checks past the feature rule (budget {FALSE_ALARM_BUDGET * checks:.2f}); "
            f"max |z| {max_z:.2f} (rule needs {float(_z_for(alpha)):.2f}); |z|>4 seen "
            f"{over4} vs {expected4:.1f} for a normal")


def _z_for(alpha: float) -> float:
    from scipy.special import ndtri

    return -float(ndtri(alpha / 2))


def iid_mixture_model(seed: int) -> tuple[FeatureReference, object, object]:
    """Four Gaussian clusters in 20 dimensions, readings drawn independently; a model fitted by
    fit_pipeline on 50,000 of them; and a sampler of the same stream."""
    from sensor_predictor.kmeans_kernel import from_pipeline
    from sensor_predictor.training import fit_pipeline

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(4, 20))

    def sample(n: int) -> np.ndarray:
        return centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 20))

    fitted = fit_pipeline(sample(50_000), 4, seed=1)
    assert fitted.feature_reference is not None
    return (FeatureReference.from_json(fitted.feature_reference),
            from_pipeline(fitted.pipeline), sample)


def outliers(ref: FeatureReference, kernel: object, stream: np.ndarray, trials: int,
             seed: int, label: str = "simulator stream (model from another seed)") -> list[str]:
    rng = np.random.default_rng(seed)
    assert ref.distance_p99 is not None
    labels0, _, dist0 = kernel.predict_with_distance(stream)  # type: ignore[attr-defined]
    share0 = float(np.mean(dist0 > ref.distance_p99))
    out = [f"outliers, {label}: {share0:.2%} of readings "
           f"beyond the training p99 ({ref.distance_p99:.3f})"]
    # Stationary: one check per reading.
    beyond = (dist0 > ref.distance_p99).astype(np.int64)
    c = np.cumsum(beyond)
    k = c[WINDOW - 1:].copy()
    k[1:] -= c[:-WINDOW]
    from scipy.special import betainc

    d = ref.outlier_inflation_at(WINDOW)
    p = betainc(np.maximum(k, 1e-9) / d, (WINDOW - k) / d + 1, 0.01)
    p[k == 0] = 1.0
    out.append(f"  the outlier count's design effect at window {WINDOW}: {d:.2f}")
    fires = int(((k / WINDOW > SHARE) & (p < FALSE_ALARM_BUDGET)).sum())
    alert = int(((k / WINDOW > 0.05) & (p < 1e-4)).sum())
    out.append(f"  stationary: {k.size:,} checks, {fires} past the outlier rule (budget "
               f"{FALSE_ALARM_BUDGET * k.size:.2f}); max share {k.max() / WINDOW:.2f}; checks "
               f"past the alert's own condition (share > 0.05, p < 1e-4): {alert}")
    std = np.asarray(ref.std)
    scenarios = {
        "one sensor turns noisy (+3 sigma Gaussian noise)":
            lambda rows, j: _noisy(rows, j, 3 * std[j], rng),
        "one sensor off by 3 sigma": lambda rows, j: _offset(rows, j, 3 * std[j], rng),
        "new failure mode: 20% of readings +4 sigma on one sensor":
            lambda rows, j: _episode(rows, j, 4 * std[j], 0.2, rng),
    }
    for name, inject in scenarios.items():
        opened = opened_small = 0
        moved: list[float] = []
        for _ in range(trials):
            start = int(rng.integers(0, stream.shape[0] - 3 * WINDOW))
            tracker = OutlierTracker(ref.distance_p99, WINDOW, SHARE,
                                     inflation=ref.outlier_inflation_at(WINDOW))
            tracker.update(dist0[start:start + WINDOW])
            rows = stream[start + WINDOW:start + 2 * WINDOW]
            j = int(rng.integers(20))
            shifted = inject(rows.copy(), j)
            lab, _, dist = kernel.predict_with_distance(shifted)  # type: ignore[attr-defined]
            moved.append(float(np.mean(lab != labels0[start + WINDOW:start + 2 * WINDOW])))
            fired = _first_open(tracker, dist.reshape(-1, 1), 10) is not None
            opened += fired
            if moved[-1] < 0.05:
                opened_small += fired
        small = [m for m in moved if m < 0.05]
        out.append(f"  {name}: fired within one window {opened / trials:.1%} of {trials}; "
                   f"readings moved to another cluster: median {statistics.median(moved):.1%};"
                   f" of the {len(small)} trials moving under 5 %, fired "
                   f"{opened_small / max(len(small), 1):.1%}")
    return out


def _noisy(rows: np.ndarray, j: int, s: float, rng: np.random.Generator) -> np.ndarray:
    rows[:, j] += rng.normal(0, s, rows.shape[0])
    return rows


def _offset(rows: np.ndarray, j: int, s: float, rng: np.random.Generator) -> np.ndarray:
    rows[:, j] += s * rng.choice([-1.0, 1.0])
    return rows


def _episode(rows: np.ndarray, j: int, s: float, share: float, rng: np.random.Generator
             ) -> np.ndarray:
    hit = rng.random(rows.shape[0]) < share
    rows[hit, j] += s
    return rows


def cluster_rule(trials: int, seed: int) -> list[str]:
    """25 % -> 50 % of one of 4 equal clusters: the share of full windows the default rule
    (JS > 0.1 and G-test p < 0.001) flags, at windows 100 and 200."""
    rng = np.random.default_rng(seed)
    ref = np.full(4, 0.25)
    after = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    out = [f"cluster rule, 4 equal clusters, one goes 25 % -> 50 % (JS of the proportions "
           f"{js_divergence(ref, after):.3f}):"]
    for window in (100, 200):
        counts = rng.multinomial(window, after, size=trials)
        js = np.array([js_divergence(ref, c) for c in counts])
        p = np.array([g_test_p_value(c, ref) for c in counts])
        both = np.mean((js > 0.1) & (p < 0.001))
        out.append(f"  window {window}: a full window flags it {both:.1%} (JS > 0.1 alone "
                   f"{np.mean(js > 0.1):.1%}, p < 0.001 alone {np.mean(p < 0.001):.1%}); "
                   f"median JS {np.median(js):.3f}, median p {np.median(p):.1e}")
    return out


def cost(ref: FeatureReference, kernel: object, stream: np.ndarray, rounds: int,
         batches: int) -> str:
    """Per batch of 100: DriftMonitor.observe with cluster tracking only vs with the feature
    and outlier trackers, in alternating rounds; medians."""
    from dataclasses import replace as dc_replace

    from sensor_predictor.drift_monitor import DriftMonitor
    from sensor_predictor.metrics import Metrics
    from sensor_predictor.model_contract import version_label
    from sensor_predictor.model_types import ActiveRow, LoadedModel

    row = ActiveRow(1, "bench", 1, 4)
    base = LoadedModel(row=row, model_name="bench", feature_names=NAMES, n_clusters=4,
                       reference=(0.25,) * 4, read_query="", kernel=kernel)  # type: ignore[arg-type]
    full = dc_replace(base, feature_reference=ref)
    assert base.version == version_label("bench", 1)
    batch = 100
    data = [stream[i * batch:(i + 1) * batch] for i in range(batches)]
    pred = [kernel.predict_with_distance(d) for d in data]  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {"cluster only": [], "cluster + features + outliers": []}
    for _ in range(rounds):
        for name, model in (("cluster only", base), ("cluster + features + outliers", full)):
            monitor = DriftMonitor(Settings(), Metrics())
            monitor.track(model)
            started = time.process_time()
            for d, (lab, _, dist) in zip(data, pred, strict=True):
                monitor.observe(model, lab, d, dist)
            times[name].append((time.process_time() - started) / batches * 1e6)
    a = statistics.median(times["cluster only"])
    b = statistics.median(times["cluster + features + outliers"])
    per_reading = (b - a) / batch
    return (f"cost per batch of {batch} ({rounds} alternating rounds of {batches} batches, "
            f"CPU time, medians): cluster only {a:.1f} us, with features and outliers "
            f"{b:.1f} us: +{b - a:.1f} us per batch, +{per_reading:.2f} us per reading = "
            f"{per_reading / WORKER_US_PER_READING:.1%} of the worker's "
            f"{WORKER_US_PER_READING} us per reading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and readings")
    args = parser.parse_args()
    q = args.quick
    # The monitor's event logs (every simulated excursion) are not the bench's output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    started = time.perf_counter()
    from sensor_predictor.simulator.generator import generate_feature_matrix

    print(f"budget {FALSE_ALARM_BUDGET:g} false events per reading per rule; feature rule: "
          f"|effect| > {EFFECT} and p < {FALSE_ALARM_BUDGET:g}/20; outlier rule: share > "
          f"{SHARE} and binomial p < {FALSE_ALARM_BUDGET:g} (at window {WINDOW}: "
          f">= 10 outliers, P(X>=10)={binomial_tail(10, WINDOW, 0.01):.1e})")
    print()
    print(attribution_iid(200 if q else 1000, 1.0, seed=1))
    ref, kernel = _simulator_model()
    infl = ref.inflation_at(WINDOW)
    print(f"simulator model: design effect at window {WINDOW} per sensor "
          f"{min(infl):.2f}-{max(infl):.2f} (the AR(1) machines: a window holds ~"
          f"{WINDOW / max(infl):.0f}-{WINDOW / min(infl):.0f} readings' worth of information)")
    stream = generate_feature_matrix(200_000 if q else 1_000_000, seed=7)
    for line in attribution_simulator(ref, stream, 100 if q else 300, (1.0, 2.0, 3.0), seed=2):
        print(line)
    print()
    n_iid = 1_000_000 if q else 10_000_000
    rng = np.random.default_rng(3)
    iid_ref = FeatureReference(NAMES, (0.0,) * 20, (1.0,) * 20)
    print(false_alarms_features(iid_ref, lambda n, _: rng.normal(size=(n, 20)), n_iid,
                                500_000, "false alarms, iid"))
    print(false_alarms_features(ref, lambda n, off: stream[off:off + n], stream.shape[0],
                                500_000, "false alarms, simulator"))
    print()
    for line in outliers(ref, kernel, stream, 100 if q else 300, seed=4):
        print(line)
    mref, mkernel, msample = iid_mixture_model(seed=8)
    mstream = msample(200_000 if q else 1_000_000)  # type: ignore[operator]
    for line in outliers(mref, mkernel, mstream, 100 if q else 300, seed=9,
                         label="iid stream of 4 Gaussian clusters in 20 dimensions"):
        print(line)
    print()
    for line in cluster_rule(2000 if q else 20_000, seed=5):
        print(line)
    print()
    print(cost(ref, kernel, stream, 3 if q else 7, 500 if q else 2000))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
