"""The old trainer's models, served: real MLflow stores, a real MLflow 2.21 client, the worker.

Models are logged by sensor_predictor.devtools.legacy_trainer exactly as the old trainer logs
them (episode aggregates, `log_model(kmeans, "kmeans_model", ...)` with the artifact path
positional, scaler.pkl and profiles.json at the run root); the oracle is the old predictor's
mapping in the correct order through scikit-learn itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from sensor_predictor.devtools.legacy_trainer import (
    activate_like_old_trainer,
    episodes_from,
    fetch_legacy_parts,
    log_legacy_model,
    old_predictor_labels,
)
from sensor_predictor.devtools.mlflow_server import MlflowServer as MlflowStore
from sensor_predictor.devtools.mlflow_server import mlflow_env
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.legacy_model import build_legacy_model
from sensor_predictor.model_contract import FEATURE_NAMES, legacy_feature_order
from sensor_predictor.model_holder import load_and_verify
from sensor_predictor.model_types import ActiveRow, Bookkeeping, ModelLoadError
from sensor_predictor.simulator import generate_feature_matrix
from sensor_predictor.training import activate_model
from tests.support import ROOT
from tests.support.databases import Database
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio

MODEL_NAME = "sensor_failure_clustering"
# Where .ci/run puts a venv holding the old stack's MLflow 2.21 client.
MLFLOW2_VENV = Path(os.environ.get(
    "SP_MLFLOW2_VENV", Path.home() / ".cache" / "sensor-predictor-dev" / "mlflow-2.21.3"))


@dataclass
class Legacy:
    run_id: str
    version: int
    profiles: dict[str, Any]
    n_clusters: int


@pytest.fixture(scope="module")
def legacy_models(mlflow_store: MlflowStore) -> Iterator[dict[str, Legacy]]:
    """Old-layout runs in the session's sqlite store, logged with our MLflow 3 client."""
    cwd = Path.cwd()
    os.chdir(mlflow_store.root)  # sqlite stores put default artifact roots under the cwd
    try:
        stream = generate_feature_matrix(3_000, seed=21)
        out = {}
        for name, clusters, profiles in (("with_profiles", 4, True), ("no_profiles", 3, False)):
            if profiles:
                run_id, version, prof = log_legacy_model(mlflow_store.uri, stream, clusters, 0)
            else:
                from sensor_predictor.devtools import legacy_trainer

                run_id, version, prof, _ = legacy_trainer._log(
                    mlflow_store.uri, episodes_from(stream), clusters, 1, MODEL_NAME, False)
            out[name] = Legacy(run_id, version, prof, clusters)
        yield out
    finally:
        os.chdir(cwd)


def _readings(n: int, seed: int) -> list[dict[str, float]]:
    matrix = np.round(generate_feature_matrix(n, seed=seed, drift=True), 6)
    return [dict(zip(FEATURE_NAMES, row, strict=True)) for row in matrix.tolist()]


def _oracle(uri: str, run_id: str, readings: list[dict[str, float]]) -> list[int]:
    scaler, kmeans, order = fetch_legacy_parts(uri, run_id)
    assert order == list(legacy_feature_order(FEATURE_NAMES))  # the file kept the order
    return old_predictor_labels(scaler, kmeans, order, readings).tolist()  # type: ignore[no-any-return]


def _row(legacy: Legacy, n_clusters: int | None = None) -> ActiveRow:
    return ActiveRow(1, legacy.run_id, legacy.version, n_clusters or legacy.n_clusters)


# ----------------------------------------------------------------------------- in process


async def test_an_old_layout_run_is_served_in_the_trainers_order(
        legacy_models: dict[str, Legacy], mlflow_store: MlflowStore) -> None:
    legacy = legacy_models["with_profiles"]
    model = await asyncio.to_thread(load_and_verify, _row(legacy), MODEL_NAME)
    assert model.legacy
    assert model.version == str(legacy.version)
    assert model.n_clusters == 4
    assert model.model_features == legacy_feature_order(FEATURE_NAMES)
    assert model.feature_names == tuple(sorted(FEATURE_NAMES))  # what the worker reads
    assert model.kernel is not None  # numpy alone serves it

    readings = _readings(3_000, seed=5)
    matrix = np.array([[r[s] for s in model.feature_names] for r in readings])
    labels, confidence = model.predict(matrix)
    assert labels.tolist() == _oracle(mlflow_store.uri, legacy.run_id, readings)
    assert confidence is not None and np.all((confidence >= 0) & (confidence <= 1))


async def test_without_profiles_json_the_order_is_rebuilt_from_the_clusters_row(
        legacy_models: dict[str, Legacy]) -> None:
    legacy = legacy_models["no_profiles"]
    with pytest.raises(ModelLoadError, match="feature order is unknown") as refused:
        await asyncio.to_thread(load_and_verify, _row(legacy), MODEL_NAME)
    assert refused.value.reason == "no_feature_names"

    # jsonb gives the keys back in its own order (shortest first): the rule restores it.
    shuffled = {name: {**p, "all_features": dict(sorted(p["all_features"].items(),
                                                       key=lambda kv: (len(kv[0]), kv[0])))}
                for name, p in legacy.profiles.items()}
    model = await asyncio.to_thread(load_and_verify, _row(legacy), MODEL_NAME,
                                    Bookkeeping(3, None, shuffled))
    assert model.legacy and model.n_clusters == 3
    assert model.model_features == legacy_feature_order(FEATURE_NAMES)


async def test_an_order_that_disagrees_with_the_scaler_or_the_profiles_is_refused(
        legacy_models: dict[str, Legacy], mlflow_store: MlflowStore) -> None:
    legacy = legacy_models["with_profiles"]
    scaler, kmeans, order = await asyncio.to_thread(
        fetch_legacy_parts, mlflow_store.uri, legacy.run_id)
    row = _row(legacy)

    def profiles_with(features: list[str]) -> dict[str, Any]:
        return {f"cluster_{i}": {"size": 1, "all_features": {k: 0.0 for k in features}}
                for i in range(4)}

    cases = {
        "scaler was fitted on 81": profiles_with([k for k in order if "Sensor 7_" not in k]),
        "not the trainer's": profiles_with([*order[:-1], "x_mean"]),
        "neither": profiles_with([*order[:-1], "elapsed"]),
    }
    for message, profiles in cases.items():
        with pytest.raises(ModelLoadError, match=message) as refused:
            build_legacy_model(row, MODEL_NAME, scaler, kmeans, profiles, None)
        assert refused.value.reason == "feature_mismatch"
    odd = profiles_with(order)
    odd["cluster_2"]["all_features"] = {k: 0.0 for k in order[:-1]}
    with pytest.raises(ModelLoadError, match="name other features"):
        build_legacy_model(row, MODEL_NAME, scaler, kmeans, odd, None)
    # The same parts with the file's own profiles are served.
    assert build_legacy_model(row, MODEL_NAME, scaler, kmeans, profiles_with(order), None).legacy


# ------------------------------------------------------------------------------ the worker


async def _scored(conn: asyncpg.Connection, n: int) -> bool:
    return int(await conn.fetchval("SELECT count(*) FROM predictions")) >= n


async def _serve_and_compare(conn: asyncpg.Connection, worker: WorkerProcess, uri: str,
                             legacy: Legacy) -> list[dict[str, Any]]:
    await worker.until_ready()
    readings = _readings(400, seed=17)
    ids = await insert_readings(conn, list(readings))  # type: ignore[arg-type]
    assert await wait_for(lambda: _scored(conn, len(ids)), timeout=20), worker.logs()[-3000:]
    rows = await conn.fetch("SELECT reading_id, cluster_id, model_version, mlflow_run_id"
                            " FROM predictions ORDER BY reading_id")
    assert [r["reading_id"] for r in rows] == ids
    assert {(r["model_version"], r["mlflow_run_id"]) for r in rows} == {
        (str(legacy.version), legacy.run_id)}
    expected = await asyncio.to_thread(_oracle, uri, legacy.run_id, readings)
    assert [r["cluster_id"] for r in rows] == expected
    assert len(set(expected)) > 1
    return worker.events()


async def test_the_worker_serves_an_old_trainer_model_with_the_old_predictors_ids(
        conn: asyncpg.Connection, legacy_models: dict[str, Legacy], mlflow_store: MlflowStore,
        worker_factory: WorkerFactory) -> None:
    legacy = legacy_models["with_profiles"]
    await activate_like_old_trainer(conn, legacy.run_id, legacy.version, 4, 0.3,
                                    legacy.profiles)
    worker = worker_factory().start()
    events = await _serve_and_compare(conn, worker, mlflow_store.uri, legacy)
    served = [e for e in events if e.get("event") == "legacy_model_served"]
    assert len(served) == 1 and served[0]["level"] == "warning"
    assert "episode" in served[0]["note"]
    assert not [e for e in events if e.get("event") == "model_bookkeeping_mismatch"]


async def test_bookkeeping_that_disagrees_is_logged_and_the_model_served(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory) -> None:
    run_id, version = models.v1  # 4 clusters
    await activate_model(conn, run_id, version, n_clusters=3)
    await conn.execute("UPDATE clusters SET silhouette_score = 7,"
                       " cluster_profiles = '{\"0\": {\"x\": 1}}' WHERE is_active")
    worker = worker_factory().start()
    await worker.until_ready()
    assert worker.ready()["model_version"] == str(version)  # type: ignore[index]
    ids = await insert_readings(conn, [dict(r) for r in _readings(20, seed=1)])
    assert await wait_for(lambda: _scored(conn, len(ids)), timeout=10)
    mismatch = [e for e in worker.events() if e.get("event") == "model_bookkeeping_mismatch"]
    assert len(mismatch) == 1 and mismatch[0]["level"] == "warning"
    assert {"n_clusters", "silhouette_score", "cluster_profiles",
            "cluster_profile_features"} <= set(mismatch[0])
    assert not [e for e in worker.events() if e.get("event") == "model_load_failed"]


# ---------------------------------------------------------------------------- MLflow 2.21


MLFLOW2_TEST = "test_a_model_logged_by_an_mlflow_2_21_client_is_served"


@dataclass
class Mlflow2Logging:
    """The MLflow 2.21 client's `legacy_trainer` run, a subprocess of the old stack's venv."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def result(self, timeout: float = 240) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        assert code == 0, self.err.read_text()[-3000:]
        result: dict[str, Any] = json.loads(self.out.read_text().strip().splitlines()[-1])
        return result


def _start_mlflow2_logging(uri: str, folder: Path, clusters: int, seed: int) -> Mlflow2Logging:
    episodes = folder / "episodes.json"
    episodes.write_text(json.dumps(episodes_from(generate_feature_matrix(3_000, seed=8))))
    out, err = folder / "stdout", folder / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:  # the child keeps its own
        proc = subprocess.Popen(
            [str(MLFLOW2_VENV / "bin" / "python"), "-m", "sensor_predictor.devtools.legacy_trainer",
             "--tracking-uri", uri, "--episodes", str(episodes), "--clusters", str(clusters),
             "--seed", str(seed)],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=stdout, stderr=stderr)
    return Mlflow2Logging(proc, out, err)


@pytest.fixture(scope="module", autouse=True)
def mlflow2_logging(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Mlflow2Logging | None]:
    """The old client logs its model (10-15 s of imports and logging here) while the module's
    other tests run: started with the module when its test is selected, taken by its test."""
    if not (MLFLOW2_VENV / ".complete").exists() or not any(
            item.name == MLFLOW2_TEST and item.module is request.module
            for item in request.session.items):
        yield None
        return
    server: MlflowStore = request.getfixturevalue("mlflow_server")
    logging = _start_mlflow2_logging(server.uri, tmp_path_factory.mktemp("mlflow2"), 4, 0)
    try:
        yield logging
    finally:
        if logging.proc.poll() is None:
            logging.proc.kill()
            logging.proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not (MLFLOW2_VENV / ".complete").exists(),
                    reason=f"no MLflow 2.21 client venv at {MLFLOW2_VENV} (.ci/run creates it)")
async def test_a_model_logged_by_an_mlflow_2_21_client_is_served(
        conn: asyncpg.Connection, database: Database, mlflow_server: MlflowStore,
        mlflow2_logging: Mlflow2Logging | None, tmp_path: Path) -> None:
    assert mlflow2_logging is not None
    logged = await asyncio.to_thread(mlflow2_logging.result)
    assert logged["mlflow_version"] == "2.21.3"
    assert isinstance(logged["version"], int)
    legacy = Legacy(logged["run_id"], logged["version"], logged["profiles"], 4)
    await activate_like_old_trainer(conn, legacy.run_id, legacy.version, 4,
                                    logged["silhouette"], legacy.profiles)
    worker = WorkerProcess({**database.env(), **mlflow_env(mlflow_server.uri),
                            "INFERENCE_INTERVAL_SECONDS": "30"}, tmp_path / "worker.log")
    worker.start()
    try:
        events = await _serve_and_compare(conn, worker, mlflow_server.uri, legacy)
    finally:
        worker.stop()
    assert [e["event"] for e in events if e.get("event") == "legacy_model_served"] == [
        "legacy_model_served"]
    # scikit-learn 1.6 pickles, read by ours: logged as a warning, never a failure.
    warned = [w for e in events if e.get("event") == "model_load_warnings" for w in e["warnings"]]
    assert warned and all("InconsistentVersionWarning" in w for w in warned), warned
