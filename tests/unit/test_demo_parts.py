"""The demo's pure parts: the status line, the summary and its verdict, options, formatting."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sensor_predictor.demo.console import format_ms
from sensor_predictor.demo.postgres import DemoError, named_by_environment, reachable_by_others
from sensor_predictor.demo.status import STATUS_HEADER, Sample, status_line
from sensor_predictor.demo.summary import DriftRow, Facts, ShadowRow, render, verdict
from sensor_predictor.demo.timeline import Options
from sensor_predictor.devtools.tally import Tally
from sensor_predictor.snapshot import WorkerSnapshot

INF = float("inf")


def snapshot(predictions: int, bad: int = 0, buckets: list[tuple[float, float]] | None = None,
             score: float | None = None, detected: bool = False) -> WorkerSnapshot:
    return WorkerSnapshot(ready=True, model_version="1", predictions=predictions,
                          bad_readings=bad, latency_buckets=buckets or [], drift_score=score,
                          drift_detected=detected, drift_events=int(detected), backlog=0,
                          metrics_port=8001)


def test_format_ms() -> None:
    assert format_ms(None) == "-"
    assert format_ms(0.0123) == "12.3"
    assert format_ms(0.25) == "250"


def test_the_status_line_shows_rates_and_latency_of_the_interval_only() -> None:
    before = Sample(10.0, 1000, snapshot(900, buckets=[(0.01, 900.0), (0.1, 900.0), (INF, 900.0)]),
                    100)
    now = Sample(12.0, 2000, snapshot(1880, 20, [(0.01, 900.0), (0.1, 1880.0), (INF, 1880.0)],
                                      score=0.2, detected=True), 5)
    line = status_line(42.0, before, now, "2")
    fields = line.split()
    assert fields[:3] == ["42.0s", "500", "500"]  # 1000 written, 1000 scored in 2 s
    # Every observation of the interval is in (0.01, 0.1]: p50 interpolates inside it.
    assert fields[3] == "55.0"
    assert "0.200 DRIFT" in line and "v2" in line and fields[-1] == "5"
    assert len(STATUS_HEADER.split()) == 10  # time written/s scored/s p50 ms p99 ms ...


def test_the_status_line_before_the_window_is_full() -> None:
    s = Sample(0.0, 0, snapshot(0), None)
    line = status_line(0.0, s, s, None)
    assert "filling" in line and line.split()[-1] == "-"


def tally(readings: int, missing: int = 0, duplicated: int = 0) -> Tally:
    return Tally(readings, readings - missing - duplicated, 0, missing, duplicated,
                 readings - missing + duplicated, 0)


def test_the_verdict() -> None:
    assert verdict(tally(10), interrupted=False)[0]
    ok, text = verdict(tally(10, missing=2), interrupted=True)
    assert ok and "2 left unscored by the interruption" in text
    assert not verdict(tally(10, missing=2), interrupted=False)[0]
    assert not verdict(tally(10, duplicated=1), interrupted=True)[0]


def test_the_summary_lists_models_drift_and_the_verdict() -> None:
    at = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    facts = Facts(tally(100), [("1", 60), ("2", 40)], [("not_a_number", 3)],
                  [DriftRow("1", 0.31, 0.4, at, None)], [(0.01, 50.0), (INF, 100.0)])
    lines, ok = render(facts, stream_seconds=10.0, target_rate=10, served=["1", "2"],
                       interrupted=False, extra=[("logs", "demo.log")])
    text = "\n".join(lines)
    assert ok
    assert "predictions        100   (v1: 60   v2: 40)" in text
    assert "bad readings       3   (not_a_number: 3)" in text
    assert "score 0.310, peak 0.400" in text and "open when the model was replaced" in text
    assert "models served      v1 -> v2" in text
    assert lines[-2].startswith("  exactly-once       OK: each of the 100 readings")
    assert lines[-1] == "  logs               demo.log"


def test_the_summary_shows_the_ids_by_model_and_the_shadow_candidate() -> None:
    facts = Facts(tally(100), [("1", 60), ("2", 40)], [], [], [],
                  clusters={"1": {0: 30, 1: 30}, "2": {0: 10, 1: 30}},
                  shadow=[ShadowRow("2", 50, 5, 0.8123, 0.9, 0.02)])
    text = "\n".join(render(facts, stream_seconds=10.0, target_rate=10, served=["1", "2"],
                            interrupted=False)[0])
    assert "  by cluster id      v1  0: 50%  1: 50%\n                     v2  0: 25%  1: 75%" \
        in text
    assert ("  shadow             candidate v2: 50 readings scored beside the active model, "
            "5 window(s): adjusted Rand index 0.812, same stable id 0.900, its own drift 0.020"
            ) in text


def test_options_reject_an_unknown_postgres_mode(tmp_path: Path) -> None:
    args = argparse.Namespace(duration=5, rate=10, workdir=str(tmp_path), postgres=None)
    assert Options.from_args(args, {"DEMO_POSTGRES": " Embedded "}).mode == "embedded"
    assert Options.from_args(args, {}).mode == "auto"
    with pytest.raises(DemoError, match="must be one of"):
        Options.from_args(args, {"DEMO_POSTGRES": "mysql"})


def test_postgres_named_by_the_environment(tmp_path: Path) -> None:
    assert named_by_environment({"POSTGRES_HOST": "x", "PGHOST": "y", "POSTGRES_DB": "z"}) == [
        "POSTGRES_DB", "POSTGRES_HOST"]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert not reachable_by_others(private / "data")
