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

