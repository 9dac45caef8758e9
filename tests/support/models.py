"""Models trained once per session by the product's own trainer, and their activation."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass

import asyncpg

from sensor_predictor.config import load_settings
from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import PgServer, create_database, drop_database


@dataclass
class Models:
    """Runs logged once per session: two good models and one whose features match nothing."""

    store: MlflowServer
    v1: tuple[str, int]  # (run_id, registered version)
    v2: tuple[str, int]
    wrong_features: tuple[str, int]


def log_models(pg_server: PgServer, store: MlflowServer) -> Models:
    """Train through the product's own trainer (generated readings: the scratch DB is empty)."""
    from sensor_predictor.migrate import migrate
    from sensor_predictor.training import train
    from tests.model_factory import log_model_with_features

    scratch = f"sp_models_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def go() -> Models:
        await create_database(pg_server, scratch)
        c = await pg_server.connect(scratch)
        await migrate(c)
        await c.close()
        settings = load_settings({**pg_server.env(scratch), **mlflow_env(store.uri)})
        try:
            # 5,000 generated readings keep the fit quick.
            one = await train(settings, clusters=4, readings=5_000, activate=False, seed=1)
            two = await train(settings, clusters=3, readings=5_000, activate=False, seed=2)
        finally:
            await drop_database(pg_server, scratch)
        bad = await asyncio.to_thread(
            log_model_with_features, store.uri, [f"Temperature {i}" for i in range(1, 21)])
        return Models(store, (one.run_id, int(one.version)), (two.run_id, int(two.version)), bad)

    return asyncio.run(go())


def log_retrain(pg_server: PgServer, store: MlflowServer, seed: int = 2) -> tuple[str, int]:
    """The hourly retrain: the same trainer, 4 clusters again, another sample and seed. KMeans
    numbers its clusters differently this time (test_stable_cluster_ids checks it does)."""
    from sensor_predictor.migrate import migrate
    from sensor_predictor.training import train

    scratch = f"sp_retrain_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def go() -> tuple[str, int]:
        await create_database(pg_server, scratch)
        c = await pg_server.connect(scratch)
        await migrate(c)
        await c.close()
        settings = load_settings({**pg_server.env(scratch), **mlflow_env(store.uri)})
        try:
            result = await train(settings, clusters=4, readings=5_000, activate=False,
                                 seed=seed)
        finally:
            await drop_database(pg_server, scratch)
        return result.run_id, int(result.version)

    return asyncio.run(go())


async def activate(conn: asyncpg.Connection, run_id: str, version: int | None,
                   n_clusters: int | None = None) -> int:
    """What any client does to deploy a model: one SQL transaction."""
    async with conn.transaction():
        await conn.execute("UPDATE clusters SET is_active = false WHERE is_active")
        row_id: int = await conn.fetchval(
            "INSERT INTO clusters (mlflow_run_id, mlflow_model_version, is_active, n_clusters)"
            " VALUES ($1, $2, true, $3) RETURNING id", run_id, version, n_clusters)
    return row_id
