"""Model swaps that fail: MLflow down, a run that does not exist, features the readings lack."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from sensor_predictor.devtools.mlflow_server import MlflowServer
from sensor_predictor.devtools.worker_process import WorkerProcess
from sensor_predictor.training import activate_model
from tests.support.chaos import StreamWriter, check_invariant, served, unscored, wait_settled
from tests.support.chaos_fixtures import Workers
from tests.support.databases import Database
from tests.support.models import Models

pytestmark = [pytest.mark.asyncio, pytest.mark.chaos]


async def _metric(worker: WorkerProcess, name: str, labels: str = "") -> float:
    return await asyncio.to_thread(worker.metric, name, labels) or 0.0


async def _wait_metric(worker: WorkerProcess, name: str, labels: str, predicate: Any,
                       timeout: float) -> float | None:  # noqa: ASYNC109
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = await _metric(worker, name, labels)
        if predicate(value):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def _versions_of_readings_after(conn: asyncpg.Connection, reading_id: int) -> set[str]:
    return {r[0] for r in await conn.fetch(
        "SELECT DISTINCT model_version FROM predictions WHERE reading_id > $1", reading_id)}


async def _wrote_beyond(writer: StreamWriter, mark: int, rows: int = 30,
                        timeout: float = 20) -> int:  # noqa: ASYNC109
    """Until the writer has committed `rows` more readings after id `mark`; its max id then."""
    started = time.monotonic()
    while writer.stats.committed == 0 or writer.stats.max_id < mark + rows:
        assert time.monotonic() - started < timeout, "the writer does not progress"
        await asyncio.sleep(0.02)
    return writer.stats.max_id


async def _first_prediction(conn: asyncpg.Connection, timeout: float = 20) -> None:  # noqa: ASYNC109
    started = time.monotonic()
    while not await conn.fetchval("SELECT count(*) FROM predictions"):
        assert time.monotonic() - started < timeout, "nothing scored"
        await asyncio.sleep(0.02)


async def _switched_once(conn: asyncpg.Connection, old: str, new: str, at_least: int = 30,
                         timeout: float = 30) -> None:  # noqa: ASYNC109
    """Readings are handed out in stream order, so after a swap the old model predicts nothing
    written after the first reading the new one predicted: every `old` prediction is below
    every `new` one. Waits until the new model has predicted `at_least` readings."""
    started = time.monotonic()
    while int(await conn.fetchval(
            "SELECT count(*) FROM predictions WHERE model_version = $1", new)) < at_least:
        assert time.monotonic() - started < timeout, f"model {new} predicts nothing"
        await asyncio.sleep(0.05)
    last_old, first_new = await conn.fetchrow(
        "SELECT max(reading_id) FILTER (WHERE model_version = $1),"
        "       min(reading_id) FILTER (WHERE model_version = $2) FROM predictions", old, new)
    assert last_old is None or last_old < first_new, (last_old, first_new)


async def _scored_up_to(conn: asyncpg.Connection, mark: int, timeout: float = 20) -> None:  # noqa: ASYNC109
    started = time.monotonic()
    while (left := await unscored(conn, up_to=mark)) > 0:
        assert time.monotonic() - started < timeout, (
            f"{left} readings up to id {mark} not scored in {timeout} s (no model serving?)")
        await asyncio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.own_model_cache  # v2 must come from MLflow: a cached v2 would need no MLflow
async def test_mlflow_down_during_a_swap_old_model_serves_then_the_swap_goes_through(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        chaos_mlflow: MlflowServer, workers: Workers, report: Any) -> None:
    conn = chaos_conn
    v1, v2 = chaos_models.v1, chaos_models.v2
    await activate_model(conn, *v1)
    worker = workers.start()
    await asyncio.to_thread(worker.wait_ready)
    async with StreamWriter(chaos_db.server, chaos_db.name, rows=10, pause=0.05) as writer:
        await _first_prediction(conn)
        await asyncio.to_thread(chaos_mlflow.stop)
        try:
            await activate_model(conn, *v2)
            failed = await _wait_metric(worker, "sensor_model_load_failures_total",
                                        'reason="mlflow_unreachable"', lambda v: v >= 1, 30)
            assert failed is not None, worker.logs()[-3000:]
            # The old model keeps serving what is written while MLflow is away.
            swap_mark = writer.stats.max_id
            mark = await _wrote_beyond(writer, swap_mark)
            await _scored_up_to(conn, mark)
            assert await _versions_of_readings_after(conn, swap_mark) == {str(v1[1])}
            assert (await asyncio.to_thread(worker.ready) or {}).get("model_version") == str(v1[1])
        finally:
            restart_s = await asyncio.to_thread(chaos_mlflow.start)
        back = time.monotonic()
        swapped = await _wait_metric(worker, "sensor_model_version", "",
                                     lambda v: v == float(v2[1]), 90)
        assert swapped is not None, worker.logs()[-3000:]
        swapped = time.monotonic() - back
        # Readings written once the swap is done are scored by the new model, and only by it.
        await _switched_once(conn, str(v1[1]), str(v2[1]))
        stats = await writer.stop()
    assert await wait_settled(conn, 30)
    outcome = await check_invariant(conn, served(v1, v2), stats.committed)
    await _switched_once(conn, str(v1[1]), str(v2[1]))
    failures = [e for e in worker.events() if e.get("event") == "model_load_failed"]
    assert failures and all(e["reason"] == "mlflow_unreachable" for e in failures), failures
    assert all(e["serving"] == str(v1[1]) for e in failures), failures
    report(scenario="6a. MLflow down during a swap", runs=1, readings=outcome.tally.readings,
           lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=(f"swap done {swapped:.1f} s after MLflow answered again "
                     f"(its restart took {restart_s:.1f} s)"),
           detail=(f"{len(failures)} model_load_failed (mlflow_unreachable) while down, v1 "
                   "served meanwhile; the retry backoff (1, 2, 4 ... 60 s) sets the delay"))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_unknown_run_and_mismatched_features_keep_the_old_model(
        chaos_db: Database, chaos_conn: asyncpg.Connection, chaos_models: Models,
        workers: Workers, report: Any) -> None:
    conn = chaos_conn
    v1, v2 = chaos_models.v1, chaos_models.v2
    await activate_model(conn, *v1)
    worker = workers.start()
    await asyncio.to_thread(worker.wait_ready)
    async with StreamWriter(chaos_db.server, chaos_db.name, rows=10, pause=0.05) as writer:
        await _first_prediction(conn)
        cases = [("0" * 32, 999, "not_found"), (*chaos_models.wrong_features, "feature_mismatch")]
        seen: list[str] = []
        for run_id, version, reason in cases:
            await activate_model(conn, run_id, version)
            mark = writer.stats.max_id
            # Each load the cache cannot serve starts a fetch process that imports MLflow
            # (model_fetch.py): seconds, more on a busy machine.
            took = await _wait_metric(worker, "sensor_model_load_failures_total",
                                      f'reason="{reason}"', lambda v: v >= 1, 60)
            assert took is not None, worker.logs()[-3000:]
            seen.append(f"{reason} in {took:.1f} s")
            await _scored_up_to(conn, await _wrote_beyond(writer, writer.stats.max_id))
            assert await _versions_of_readings_after(conn, mark) == {str(v1[1])}
            assert await _metric(worker, "sensor_model_version") == float(v1[1])
        # A later good activation goes through.
        await activate_model(conn, *v2)
        swapped = await _wait_metric(worker, "sensor_model_version", "",
                                     lambda v: v == float(v2[1]), 30)
        assert swapped is not None, worker.logs()[-3000:]
        await _switched_once(conn, str(v1[1]), str(v2[1]))
        stats = await writer.stop()
    assert await wait_settled(conn, 30)
    outcome = await check_invariant(conn, served(v1, v2), stats.committed)
    await _switched_once(conn, str(v1[1]), str(v2[1]))
    failures = [e for e in worker.events() if e.get("event") == "model_load_failed"]
    assert {e["reason"] for e in failures} == {"not_found", "feature_mismatch"}, failures
    assert all(e["serving"] == str(v1[1]) for e in failures)
    state = await asyncio.to_thread(worker.ready)
    assert state is not None and state["ready"] and state["model_version"] == str(v2[1])
    report(scenario="6b. unknown run / features mismatch", runs=2,
           readings=outcome.tally.readings, lost=outcome.lost, duplicated=outcome.duplicated,
           recovery=f"good activation served {swapped:.1f} s later",
           detail="failures seen (log + metric): " + ", ".join(seen) + "; v1 served meanwhile")
