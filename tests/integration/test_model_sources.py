"""Models only from where the operator allows, read without pickle, refused when their artifacts
changed: real MLflow (sqlite) stores, models logged by the product's own trainer, the holder
against a real PostgreSQL (model_artifact_digests)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from sensor_predictor.config import load_settings
from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database
from sensor_predictor.model_contract import MODEL_JSON_ARTIFACT
from sensor_predictor.model_holder import ModelHolder, load_and_verify
from sensor_predictor.model_sources import SourcePolicy
from sensor_predictor.model_types import ActiveRow, ModelLoadError
from sensor_predictor.training import activate_model, train
from tests.support.databases import Database

pytestmark = pytest.mark.asyncio

ELSEWHERE = "elsewhere"


@dataclass
class Store:
    uri: str
    root: Path
    home: tuple[str, int]  # a run in the store's default experiment (artifacts in its folder)
    away: tuple[str, int]  # a run whose experiment keeps artifacts outside the store's folder
    away_root: Path


def _artifact_dir(uri: str, run_id: str) -> Path:
    from mlflow import MlflowClient

    return Path(unquote(urlsplit(MlflowClient(uri).get_run(run_id).info.artifact_uri).path))


@pytest.fixture(scope="module")
def store(pg_server: PgServer, template_db: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    import mlflow

    root = tmp_path_factory.mktemp("sources")
    away_root = tmp_path_factory.mktemp("sources-elsewhere")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd = Path.cwd()
    os.chdir(root)  # sqlite stores put default artifact roots under the cwd

    async def go() -> tuple[tuple[str, int], tuple[str, int]]:
        scratch = "sp_sources_" + os.urandom(4).hex()
        await create_database(pg_server, scratch, template=template_db)
        settings = load_settings({**pg_server.env(scratch), "MLFLOW_TRACKING_URI": uri})
        try:
            home = await train(settings, clusters=3, readings=2_000, min_readings=10**9,
                               activate=False, seed=3)
            mlflow.set_tracking_uri(uri)
            mlflow.create_experiment(ELSEWHERE, artifact_location=away_root.as_uri())
            away = await train(settings, clusters=3, readings=2_000, min_readings=10**9,
                               activate=False, seed=4, experiment_name=ELSEWHERE)
        finally:
            await drop_database(pg_server, scratch)
        return (home.run_id, int(home.version)), (away.run_id, int(away.version))

    try:
        home, away = asyncio.run(go())
        yield Store(uri, root, home, away, away_root)
    finally:
        os.chdir(cwd)


def _row(run: tuple[str, int]) -> ActiveRow:
    return ActiveRow(1, run[0], run[1], None)


def _load(store: Store, run: tuple[str, int], *allowed: str) -> object:
    import mlflow

    mlflow.set_tracking_uri(store.uri)
    return load_and_verify(_row(run), "m", None, SourcePolicy(store.uri, tuple(allowed)))


async def test_a_run_whose_artifacts_live_elsewhere_is_refused_unless_allowed(
        store: Store) -> None:
    # Ours, in the store's own folder: served by default, and read without pickle.
    model = await asyncio.to_thread(_load, store, store.home)
    assert not model.unpickled and model.pipeline is None  # type: ignore[attr-defined]
    # The same trainer, but its experiment keeps artifacts in another folder.
    with pytest.raises(ModelLoadError) as refused:
        await asyncio.to_thread(_load, store, store.away)
    assert refused.value.reason == "source_not_allowed"
    assert str(store.away_root) in str(refused.value)
    # A `..` does not escape the allowed folder.
    with pytest.raises(ModelLoadError) as escaped:
        await asyncio.to_thread(_load, store, store.away, store.uri,
                                (store.root / ".." / store.root.name).as_uri())
    assert escaped.value.reason == "source_not_allowed"
    # Named by the operator, it is served.
    allowed = await asyncio.to_thread(_load, store, store.away, store.uri,
                                      store.away_root.as_uri())
    assert allowed.version == str(store.away[1])  # type: ignore[attr-defined]
    # A tracking URI that is not on the list: nothing is read at all.
    with pytest.raises(ModelLoadError) as tracking:
        await asyncio.to_thread(_load, store, store.home, store.away_root.as_uri())
    assert tracking.value.reason == "source_not_allowed"
    assert "tracking URI" in str(tracking.value)


async def test_the_holder_names_the_refusal_and_keeps_serving(
        store: Store, conn: asyncpg.Connection, database: Database) -> None:
    import mlflow

    mlflow.set_tracking_uri(store.uri)
    reasons: list[str] = []
    pool = await asyncpg.create_pool(**database.server.kwargs(database.name), min_size=1,
                                     max_size=2)
    try:
        holder = ModelHolder("m", on_failure=reasons.append, sources=SourcePolicy(store.uri))
        await activate_model(conn, *store.home)
        assert await holder.refresh(pool)
        await activate_model(conn, *store.away)  # a model from elsewhere is activated
        assert not await holder.refresh(pool)
        assert reasons == ["source_not_allowed"]
        assert holder.current is not None and holder.current.run_id == store.home[0]
    finally:
        await pool.close()


async def test_a_damaged_json_artifact_is_refused_without_unpickling_the_model(
        store: Store, tmp_path: Path) -> None:
    path = _artifact_dir(store.uri, store.home[0]) / MODEL_JSON_ARTIFACT
    original = path.read_bytes()
    document = json.loads(original)
    try:
        document["kernel"]["centers"] = document["kernel"]["centers"][:-1]  # 2 centres, says 3
        path.write_text(json.dumps(document))
        with pytest.raises(ModelLoadError) as refused:
            await asyncio.to_thread(_load, store, store.home)
        assert refused.value.reason == "bad_model_artifact"
        assert "not tried instead" in str(refused.value)
    finally:
        path.write_bytes(original)


async def test_artifacts_changed_under_the_same_run_and_version_are_refused(
        store: Store, conn: asyncpg.Connection, database: Database) -> None:
    import mlflow

    mlflow.set_tracking_uri(store.uri)
    path = _artifact_dir(store.uri, store.home[0]) / MODEL_JSON_ARTIFACT
    original = path.read_bytes()
    pool = await asyncpg.create_pool(**database.server.kwargs(database.name), min_size=1,
                                     max_size=2)
    try:
        await activate_model(conn, *store.home)
        first = ModelHolder("m", sources=SourcePolicy(store.uri))
        assert await first.refresh(pool)
        recorded = await conn.fetchval(
            "SELECT digest FROM model_artifact_digests WHERE mlflow_run_id = $1", store.home[0])
        assert recorded == first.current.artifact_digest  # type: ignore[union-attr]
        assert str(recorded).startswith("sha256:")
        # Someone with write access to the artifact store moves a centre, validly.
        document = json.loads(original)
        document["kernel"]["centers"][0][0] += 5.0
        path.write_text(json.dumps(document))
        reasons: list[str] = []
        second = ModelHolder("m", on_failure=reasons.append, sources=SourcePolicy(store.uri))
        assert not await second.refresh(pool)
        assert reasons == ["artifacts_changed"]
        # Put back, it is the model first served again.
        path.write_bytes(original)
        third = ModelHolder("m", sources=SourcePolicy(store.uri))
        assert await third.refresh(pool)
    finally:
        path.write_bytes(original)
        await pool.close()


class _Planted:
    """A pickle that leaves a file behind when it is loaded: proof it was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


async def test_a_model_that_fails_to_load_does_not_fall_through_to_unpickling_scaler_pkl(
        store: Store, tmp_path: Path) -> None:
    """A pickled `model` (no JSON artifact: another tool's run) that fails to load is refused;
    the run's scaler.pkl (the old trainer's layout) is never unpickled in its place."""
    import pickle

    import mlflow

    from tests.model_factory import log_model_with_features

    cwd = Path.cwd()
    os.chdir(store.root)
    try:
        run_id, version = await asyncio.to_thread(
            log_model_with_features, store.uri, [f"Sensor {i}" for i in range(1, 21)])
    finally:
        os.chdir(cwd)
    marker = tmp_path / "unpickled"
    run_dir = _artifact_dir(store.uri, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "scaler.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    # It serves as it is (unpickled, from an allowed source: the allow-list's job).
    model = await asyncio.to_thread(_load, store, (run_id, version))
    assert model.unpickled  # type: ignore[attr-defined]
    assert not marker.exists()
    # Its pickled model damaged: refused, and scaler.pkl left alone.
    mlflow.set_tracking_uri(store.uri)
    logged = next(m for m in mlflow.MlflowClient().search_logged_models(
        experiment_ids=[mlflow.get_run(run_id).info.experiment_id]) if m.source_run_id == run_id)
    folder = Path(unquote(urlsplit(logged.artifact_location).path))
    names = os.listdir(folder)
    damaged = [folder / n for n in names if n.endswith((".pkl", ".skops"))]
    assert damaged, names
    for path in damaged:  # MLflow 3 writes skops, older versions a pickle
        path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError) as refused:
        await asyncio.to_thread(_load, store, (run_id, version))
    assert refused.value.reason == "load_failed", refused.value
    assert not marker.exists(), "scaler.pkl was unpickled after the model failed to load"
