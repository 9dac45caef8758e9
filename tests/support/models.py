"""Models trained once per session by the product's own trainer.

They are activated by the product's activation too: sensor_predictor.training.activate_model
(its advisory lock, the deactivation, the clusters upsert and the versions notice).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass

from sensor_predictor.config import load_settings
from sensor_predictor.devtools.mlflow_server import MlflowServer, mlflow_env
from sensor_predictor.devtools.postgres import PgServer, create_database
from tests.support.databases import drop_later


@dataclass
class Models:
    """Runs logged once per session: two good models and one whose features match nothing."""

    store: MlflowServer
    v1: tuple[str, int]  # (run_id, registered version)
    v2: tuple[str, int]
    wrong_features: tuple[str, int]


async def _fit(pg_server: PgServer, store: MlflowServer,
               fits: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """Train through the product's own trainer in a scratch database (empty, so on generated
    readings: 5,000 keep the fit quick), one model per (clusters, seed); (run id, version)."""
    from sensor_predictor.migrate import migrate
    from sensor_predictor.training import train

    scratch = f"sp_models_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await create_database(pg_server, scratch)
    c = await pg_server.connect(scratch)
    await migrate(c)
    await c.close()
    settings = load_settings({**pg_server.env(scratch), **mlflow_env(store.uri)})
    try:
        results = [await train(settings, clusters=clusters, readings=5_000, activate=False,
                               seed=seed) for clusters, seed in fits]
    finally:
        drop_later(pg_server, scratch)
    return [(r.run_id, int(r.version)) for r in results]


def log_models(pg_server: PgServer, store: MlflowServer) -> Models:
    """Two good models (4 and 3 clusters) and one whose features match no reading."""
    from tests.model_factory import log_model_with_features

    async def go() -> Models:
        one, two = await _fit(pg_server, store, [(4, 1), (3, 2)])
        bad = await asyncio.to_thread(
            log_model_with_features, store.uri, [f"Temperature {i}" for i in range(1, 21)])
        return Models(store, one, two, bad)

    return asyncio.run(go())


def log_retrain(pg_server: PgServer, store: MlflowServer, seed: int = 2) -> tuple[str, int]:
    """The hourly retrain: the same trainer, 4 clusters again, another sample and seed. KMeans
    numbers its clusters differently this time (test_stable_cluster_ids checks it does)."""
    return asyncio.run(_fit(pg_server, store, [(4, seed)]))[0]
