"""Stable cluster ids: the matching rule on real scikit-learn fits (no database)."""

from __future__ import annotations

import numpy as np
import pytest

from sensor_predictor.cluster_ids import (
    MATCH_FRACTION,
    Centroids,
    align,
    episode_mean_columns,
    identity,
    reading_unit_centers,
)
from sensor_predictor.kmeans_kernel import KMeansKernel, from_pipeline

FEATURES = tuple(f"Sensor {i}" for i in range(1, 21))
# Each sensor in its own units: a scaler that is not undone would compare apples and pears.
UNITS = np.geomspace(0.01, 500.0, len(FEATURES))


def blobs(n_blobs: int, per_blob: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated clusters in reading units; (rows, true blob of each row)."""
    rng = np.random.default_rng(1234)  # the same blob centres whatever the sample seed
    centres = rng.normal(scale=6.0, size=(6, len(FEATURES)))[:n_blobs]
    sample = np.random.default_rng(seed)
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[truth] + sample.normal(size=(truth.size, len(FEATURES)))
    return (x * UNITS + 3 * UNITS), truth


def fit(x: np.ndarray, k: int, seed: int) -> KMeansKernel:
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([("scaler", StandardScaler()),
                     ("kmeans", KMeans(n_clusters=k, random_state=seed, n_init=1))])
    pipe.fit(x)
    kernel = from_pipeline(pipe)
    assert kernel is not None
    return kernel


def centroids(kernel: KMeansKernel) -> Centroids:
    return Centroids(FEATURES, reading_unit_centers(kernel.mean, kernel.scale, kernel.centers),
                     float(np.linalg.norm(kernel.scale)))


def test_undoing_the_scaler_gives_the_clusters_means_in_reading_units() -> None:
    x, _ = blobs(4, 300)
    kernel = fit(x, 4, seed=0)
    labels, _ = kernel.predict(x)
    means = np.stack([x[labels == i].mean(axis=0) for i in range(4)])
    assert np.allclose(centroids(kernel).centers, means, rtol=1e-6, atol=1e-6 * UNITS.max())


def test_a_retrain_on_the_same_data_with_another_initialisation_keeps_every_readings_id(
) -> None:
    x, _ = blobs(4, 400)
    old = fit(x, 4, seed=0)
    old_ids = identity(4)
    order = np.random.default_rng(7).permutation(len(x))
    for seed in (1, 2, 3, 11, 42):
        new = fit(x[order], 4, seed=seed)
        new_labels, _ = new.predict(x)
        old_labels, _ = old.predict(x)
        result = align(centroids(new), centroids(old), old_ids.stable_ids, next_id=4)
        assert result.fresh == () and result.retired == ()
        stable_new = result.lookup()[new_labels]
        stable_old = old_ids.lookup()[old_labels]
        assert np.array_equal(stable_new, stable_old), f"seed {seed}"
    # ... and the raw labels did get renumbered by at least one of those fits (else the test
    # proves nothing).
    assert any(not np.array_equal(fit(x[order], 4, seed=s).predict(x)[0], old.predict(x)[0])
               for s in (1, 2, 3, 11, 42))


def test_one_more_cluster_keeps_the_old_ids_and_adds_one_new_id() -> None:
    x4, _ = blobs(4, 400)
    x5, truth5 = blobs(5, 400, seed=1)
    old = fit(x4, 4, seed=0)
    new = fit(x5, 5, seed=5)
    result = align(centroids(new), centroids(old), (0, 1, 2, 3), next_id=4)
    assert sorted(result.stable_ids) == [0, 1, 2, 3, 4]
    assert result.fresh == (4,) and result.retired == ()
    # The readings of the four old blobs keep the ids the old model gave them; the fifth
    # blob's readings all carry the new id.
    stable_new = result.lookup()[new.predict(x5)[0]]
    stable_old = np.asarray((0, 1, 2, 3))[old.predict(x5[truth5 < 4])[0]]
    assert np.array_equal(stable_new[truth5 < 4], stable_old)
    assert set(stable_new[truth5 == 4].tolist()) == {4}


def test_a_disappearing_cluster_retires_its_id_for_good() -> None:
    x4, truth4 = blobs(4, 400)
    old = fit(x4, 4, seed=0)
    ids4 = (10, 11, 12, 13)  # stable ids from an earlier history
    gone = int(old.predict(x4[truth4 == 3][:1])[0][0])
    three = fit(x4[truth4 < 3], 3, seed=3)
    first = align(centroids(three), centroids(old), ids4, next_id=14)
    assert first.retired == (ids4[gone],) and first.fresh == ()
    # It comes back in a later model: a new id, never the retired one.
    again = fit(x4, 4, seed=9)
    second = align(centroids(again), centroids(three), first.stable_ids, next_id=14)
    assert second.fresh == (14,)
    assert ids4[gone] not in second.stable_ids


def test_the_rule_a_pair_farther_than_half_the_nearest_neighbour_distance_is_new() -> None:
    ref = Centroids(("a", "b"), np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 4.0]]))
    # Nearest-neighbour distances: 4, sqrt(116), 4 -> limits 2, ~5.39, 2.
    near = np.array([[1.9, 0.0], [10.0, 5.0], [0.0, 4.0]])
    result = align(Centroids(("a", "b"), near), ref, (0, 1, 2), next_id=3)
    assert result.stable_ids == (0, 1, 2)
    far = np.array([[0.0, -2.1], [10.0, 0.0], [0.0, 4.0]])  # 2.1 > MATCH_FRACTION * 4
    assert MATCH_FRACTION * 4 < 2.1
    result = align(Centroids(("a", "b"), far), ref, (0, 1, 2), next_id=3)
    assert result.stable_ids == (3, 1, 2) and result.fresh == (3,) and result.retired == (0,)


def test_only_shared_features_are_compared_and_none_shared_means_all_new() -> None:
    ref = Centroids(("a", "b"), np.array([[0.0, 0.0], [10.0, 0.0]]))
    new = Centroids(("c", "b", "a"), np.array([[99.0, 0.0, 10.0], [-99.0, 0.0, 0.0]]))
    assert align(new, ref, (5, 6), next_id=7).stable_ids == (6, 5)
    other = Centroids(("x",), np.array([[0.0], [1.0]]))
    result = align(other, ref, (5, 6), next_id=7)
    assert result.stable_ids == (7, 8) and result.retired == (5, 6)


def test_a_single_old_cluster_is_judged_against_the_readings_spread() -> None:
    ref = Centroids(("a",), np.array([[0.0]]), spread=10.0)
    assert align(Centroids(("a",), np.array([[4.0]])), ref, (0,), 1).stable_ids == (0,)
    assert align(Centroids(("a",), np.array([[6.0]])), ref, (0,), 1).stable_ids == (1,)


def test_episode_models_are_compared_on_their_mean_columns() -> None:
    order = ("Sensor 1_mean", "Sensor 1_std", "Sensor 1_min", "Sensor 1_max",
             "Sensor 2_mean", "Sensor 2_std", "Sensor 2_min", "Sensor 2_max", "duration")
    assert episode_mean_columns(("Sensor 1", "Sensor 2"), order) == [0, 4]


def test_next_id_must_be_above_the_reference_ids() -> None:
    ref = Centroids(("a",), np.array([[0.0], [5.0]]))
    with pytest.raises(ValueError, match="next_id"):
        align(ref, ref, (0, 7), next_id=7)
