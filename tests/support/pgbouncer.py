"""The tests' PgBouncer: sensor_predictor.devtools.pgbouncer (the bench starts one too)."""

from sensor_predictor.devtools.pgbouncer import PgBouncer, start_pgbouncer

__all__ = ["PgBouncer", "start_pgbouncer"]
