"""The local model cache (atomic, self-checking, pruned) and the bookkeeping comparison."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from structlog.testing import capture_logs

from sensor_predictor import db
from sensor_predictor.config import load_settings
from sensor_predictor.kmeans_kernel import KMeansKernel, from_pipeline
from sensor_predictor.model_cache import CacheEntry, ModelCache
from sensor_predictor.model_holder import bookkeeping_mismatches
from sensor_predictor.model_types import ActiveRow, Bookkeeping, LoadedModel

URI = "http://mlflow:5000"


def _kernel(seed: int = 0) -> KMeansKernel:
    x = np.random.default_rng(seed).normal(size=(200, 3))
    kernel = from_pipeline(Pipeline([("s", StandardScaler()),
                                     ("k", KMeans(3, n_init=1, random_state=0))]).fit(x))
    assert kernel is not None
    return kernel


def _entry(run_id: str = "run1", version: int | None = 4) -> CacheEntry:
    return CacheEntry(run_id=run_id, registered_version=version, version_label=str(version),
                      feature_names=("a", "b", "c"), model_features=("a", "b", "c"),
                      n_clusters=3, reference=(0.2, 0.3, 0.5), legacy=False,
                      kernel=_kernel().to_arrays())


def test_an_entry_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "c", URI)
    assert cache.load("run1", 4) is None
    assert cache.store(_entry())
    loaded = cache.load("run1", 4)
    assert loaded == _entry()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [cache.path("run1", 4).name]
    again = KMeansKernel.from_arrays(loaded.kernel)
    np.testing.assert_array_equal(again.centers, _kernel().centers)


def test_the_key_is_tracking_uri_run_and_version(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, URI)
    cache.store(_entry())
    assert cache.load("run1", 5) is None
    assert cache.load("run2", 4) is None
    assert ModelCache(tmp_path, "http://other:5000").load("run1", 4) is None


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],  # truncated
    lambda b: b.replace(b'"n_clusters": 3', b'"n_clusters": 4'),  # changed: checksum
    lambda b: b"\x00\xff not json",
])
def test_a_damaged_entry_is_discarded_with_a_warning(tmp_path: Path, damage: object) -> None:
    cache = ModelCache(tmp_path, URI)
    cache.store(_entry())
    path = cache.path("run1", 4)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with capture_logs() as logs:
        assert cache.load("run1", 4) is None
    assert [e["event"] for e in logs] == ["model_cache_unreadable"]
    assert not path.exists()
    assert cache.store(_entry())  # the next fetch writes it again
    assert cache.load("run1", 4) == _entry()


def test_an_entry_renamed_to_another_key_is_refused(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, URI)
    cache.store(_entry("run1"))
    os.replace(cache.path("run1", 4), cache.path("run2", 4))
    with capture_logs() as logs:
        assert cache.load("run2", 4) is None
    assert "another model" in logs[0]["error"]


def test_only_the_newest_entries_are_kept(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, URI, keep=3)
    for i in range(5):
        cache.store(_entry(f"run{i}"))
        os.utime(cache.path(f"run{i}", 4), (1000 + i, 1000 + i))
    cache.store(_entry("run5"))
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(cache.path(f"run{i}", 4).name for i in (3, 4, 5))


def test_an_unwritable_folder_warns_once_and_serving_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = ModelCache(blocker / "cache", URI)
    with capture_logs() as logs:
        assert not cache.store(_entry())
        assert not cache.store(_entry())
    assert [e["event"] for e in logs] == ["model_cache_not_writable"]


def test_model_cache_dir_setting() -> None:
    assert load_settings({}).model_cache_dir == "~/.cache/sensor-predictor"
    assert load_settings({"MODEL_CACHE_DIR": "OFF"}).model_cache_dir == "off"
    assert load_settings({"MODEL_CACHE_DIR": "/var/cache/sp"}).model_cache_dir == "/var/cache/sp"


# ------------------------------------------------------------------------------- bookkeeping


def _model(n_clusters: int = 3, features: tuple[str, ...] = ("a", "b", "c")) -> LoadedModel:
    return LoadedModel(row=ActiveRow(1, "r", 1, None), model_name="m", feature_names=features,
                       n_clusters=n_clusters, reference=None,
                       read_query=db.read_range_query(features), kernel=_kernel(),
                       model_features=features)


def test_bookkeeping_that_agrees_reports_nothing() -> None:
    profiles = {str(i): {"a": 0.0, "b": 1.0, "c": 2.0} for i in range(3)}
    assert bookkeeping_mismatches(_model(), Bookkeeping(3, 0.4, profiles)) == {}
    assert bookkeeping_mismatches(_model(), Bookkeeping()) == {}
    assert bookkeeping_mismatches(_model(), None) == {}


def test_every_disagreement_is_named() -> None:
    profiles = {"cluster_0": {"all_features": {"a": 0.0}}, "cluster_1": {"all_features": {}}}
    found = bookkeeping_mismatches(_model(), Bookkeeping(4, 1.7, profiles))
    assert set(found) == {"n_clusters", "silhouette_score", "cluster_profiles",
                          "cluster_profile_features"}
    assert "says 4 clusters, the model has 3" in found["n_clusters"]


# -- the folder is checked, not trusted -----------------------------------------------------------


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_folder_others_may_write_is_refused_and_serving_goes_on_without_it(
        tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "cache"
    cache = ModelCache(folder, URI)
    assert cache.store(_entry())  # created 0700: trusted
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert cache.load("run1", 4) is not None
    folder.chmod(mode)  # someone loosened it: anyone in the group could now forge an entry
    with capture_logs() as logs:
        assert cache.load("run1", 4) is None
        assert not cache.store(_entry("run2"))
        assert cache.load("run1", 4) is None
    refused = [e for e in logs if e["event"] == "model_cache_refused"]
    assert len(refused) == 1 and refused[0]["reason"] == "folder_writable_by_others", logs
    assert not cache.path("run2", 4).exists()
    folder.chmod(0o700)
    assert cache.load("run1", 4) is not None  # fixed: trusted again, the entry still good


def test_a_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        folder = tmp_path / "theirs"
        ModelCache(folder, URI).store(_entry())
        os.chown(folder, 4242, 4242)
    else:
        folder = Path("/")  # root's, mode 0755: not ours
    cache = ModelCache(folder, URI)
    with capture_logs() as logs:
        assert cache.load("run1", 4) is None
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("model_cache_refused", "folder_owned_by_another_user")]


def test_an_entry_another_user_may_write_is_discarded(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, URI)
    cache.store(_entry())
    cache.path("run1", 4).chmod(0o666)
    with capture_logs() as logs:
        assert cache.load("run1", 4) is None
    assert "entry_writable_by_others" in logs[0]["error"], logs
    assert not cache.path("run1", 4).exists()
    # A symlink in place of an entry is not followed.
    cache.store(_entry())
    target = tmp_path / "elsewhere.json"
    cache.path("run1", 4).rename(target)
    cache.path("run1", 4).symlink_to(target)
    assert cache.load("run1", 4) is None


def test_the_feature_reference_travels_with_the_cached_model(tmp_path: Path) -> None:
    """The per-feature drift reference a trained model logged survives the cache; a model
    without one (or an entry from before) gets its scaler's moments and no distances."""
    from dataclasses import replace

    from sensor_predictor.feature_drift import FeatureReference, reference_from_training
    from sensor_predictor.model_holder import feature_reference

    rng = np.random.default_rng(1)
    logged = reference_from_training(("a", "b", "c"), rng.normal(size=(2000, 3)),
                                     np.abs(rng.normal(size=2000))).to_json()
    cache = ModelCache(tmp_path / "c", URI)
    assert cache.store(replace(_entry(), feature_reference=logged))
    loaded = cache.load("run1", 4)
    assert loaded is not None and loaded.feature_reference == logged
    kernel = KMeansKernel.from_arrays(loaded.kernel)
    ref = feature_reference(loaded.feature_reference, ("a", "b", "c"), kernel)
    assert ref == FeatureReference.from_json(logged) and ref.distance_p99 is not None
    derived = feature_reference(None, ("a", "b", "c"), kernel)
    assert derived is not None and derived.source == "scaler" and derived.distance_p99 is None
    np.testing.assert_allclose(derived.mean, kernel.mean)
    np.testing.assert_allclose(derived.std, kernel.scale)
    # A reference naming other features than the model's is not used.
    other = feature_reference({**logged, "names": ["x", "y", "z"]}, ("a", "b", "c"), kernel)
    assert other is not None and other.source == "scaler"
