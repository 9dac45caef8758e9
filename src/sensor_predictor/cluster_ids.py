"""Stable cluster ids across retrains: match a new model's clusters to the model it replaces.

Pure: no I/O. KMeans numbers its clusters arbitrarily, so every retrain renumbers them. A model
is aligned once, the first time it is used, against the model active at that moment (the
reference): its centroids and the reference's are compared in the readings' own units (each
model's scaler undone: `centers * scale_ + mean_`; for the old trainer's episode models, the
per-sensor `_mean` columns), over the features both models read, and paired by
`scipy.optimize.linear_sum_assignment` (minimum total Euclidean distance).

The rule for "the same cluster": a pair is kept only when the new centroid lies within half of
the old centroid's distance to its nearest other old centroid (`MATCH_FRACTION`). Inside that
ball the new centroid is nearer to its old one than to any other old centroid (triangle
inequality), so it sits in the old cluster's Voronoi cell, well away from its borders. A new
cluster that is unpaired (the new model has more clusters) or paired too far gets a fresh id,
never used before; an old id left unpaired (its cluster disappeared) stays retired: it is never
given to another cluster. With a single old cluster there is no neighbour: the yardstick is then
the size of the readings' spread (the norm of the reference scaler's scale_).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float64]

# A pair is the same cluster when the new centroid is within this fraction of the old centroid's
# nearest-neighbour distance (0.5: inside its Voronoi cell with a margin).
MATCH_FRACTION = 0.5


@dataclass(frozen=True)
class Centroids:
    """One model's cluster centres in reading units, with the stable id of each (once aligned)."""

    feature_names: tuple[str, ...]
    centers: Matrix
    """(k, p): row i is the centre of the model's label i, columns in feature_names order."""
    spread: float = 0.0
    """The size of the readings' spread (norm of the scaler's scale_), the single-cluster
    yardstick; 0 when unknown."""


@dataclass(frozen=True)
class Alignment:
    """Per model label: its stable id, and the distance to the reference centroid it matched
    (None for a fresh id)."""

    stable_ids: tuple[int, ...]
    distances: tuple[float | None, ...]
    fresh: tuple[int, ...]
    """The stable ids given for the first time."""
    retired: tuple[int, ...]
    """The reference's stable ids that no cluster of the new model carries."""

    def lookup(self) -> npt.NDArray[np.int64]:
        """An array indexed by model label giving the stable id."""
        return np.asarray(self.stable_ids, dtype=np.int64)


def reading_unit_centers(mean: Matrix, scale: Matrix, centers: Matrix) -> Matrix:
    """A StandardScaler + KMeans's centres in the units of its input: the scaler undone."""
    return np.asarray(centers, dtype=np.float64) * np.asarray(scale) + np.asarray(mean)


def episode_mean_columns(sensors: Sequence[str], model_features: Sequence[str]) -> list[int]:
    """For an old trainer's episode model: the model column of each sensor's `_mean`."""
    index = {name: i for i, name in enumerate(model_features)}
    return [index[f"{sensor}_mean"] for sensor in sensors]


def _nearest_neighbour(centers: Matrix, spread: float) -> Matrix:
    """(k,) each centre's distance to its nearest other centre; `spread` for a lone centre."""
    k = centers.shape[0]
    if k < 2:
        return np.full(k, spread, dtype=np.float64)
    d = np.linalg.norm(centers[:, None, :] - centers[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    return np.asarray(d.min(axis=1), dtype=np.float64)


def identity(n_clusters: int) -> Alignment:
    """The first model ever aligned: its labels are the stable ids."""
    return Alignment(tuple(range(n_clusters)), (None,) * n_clusters, tuple(range(n_clusters)), ())


def fresh_ids(n_clusters: int, next_id: int, retired: Sequence[int] = ()) -> Alignment:
    """Nothing to match against (no shared feature, no centroids): every label a new id."""
    ids = tuple(range(next_id, next_id + n_clusters))
    return Alignment(ids, (None,) * n_clusters, ids, tuple(retired))


def align(new: Centroids, reference: Centroids, reference_ids: Sequence[int],
          next_id: int) -> Alignment:
    """Stable ids for `new`'s labels, matched against `reference` (whose label i carries
    reference_ids[i]); fresh ids start at next_id (above every id ever given).

    Only the features both models read are compared; with none in common every cluster is new.
    """
    from scipy.optimize import linear_sum_assignment

    if len(reference_ids) != reference.centers.shape[0]:
        raise ValueError(f"{len(reference_ids)} ids for {reference.centers.shape[0]} centres")
    if next_id <= max(reference_ids, default=-1):
        raise ValueError(f"next_id {next_id} is not above the reference's ids")
    k_new = new.centers.shape[0]
    shared = [f for f in new.feature_names if f in set(reference.feature_names)]
    if not shared:
        return fresh_ids(k_new, next_id, tuple(reference_ids))
    ref_index = {f: i for i, f in enumerate(reference.feature_names)}
    new_index = {f: i for i, f in enumerate(new.feature_names)}
    a = np.asarray(new.centers, dtype=np.float64)[:, [new_index[f] for f in shared]]
    b = np.asarray(reference.centers, dtype=np.float64)[:, [ref_index[f] for f in shared]]
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)  # (k_new, k_old)
    rows, cols = linear_sum_assignment(cost)
    limit = MATCH_FRACTION * _nearest_neighbour(b, reference.spread)
    stable: list[int | None] = [None] * k_new
    distances: list[float | None] = [None] * k_new
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if cost[r, c] <= limit[c]:
            stable[r] = int(reference_ids[c])
            distances[r] = float(cost[r, c])
    fresh: list[int] = []
    for i in range(k_new):
        if stable[i] is None:
            stable[i] = next_id
            fresh.append(next_id)
            next_id += 1
    kept = {s for s in stable}
    retired = tuple(int(s) for s in reference_ids if int(s) not in kept)
    return Alignment(tuple(int(s) for s in stable if s is not None), tuple(distances),
                     tuple(fresh), retired)
