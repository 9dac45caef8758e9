"""Development tooling shipped with the package, used by the tests, the bench and the demo,
never by the worker itself (each module keeps its heavy imports inside its functions):

* `postgres`: a throwaway PostgreSQL cluster (initdb, pg_ctl), or the server the environment
  names; databases created and dropped.
* `mlflow_server`: a real `mlflow server` process.
* `worker_process`: `sensor-predictor run` as a subprocess, scraped over HTTP.
* `prometheus_text`: the /metrics text read back, and histogram quantiles.
* `tally`: the exactly-once tally (a named query).
* `old_system`: the old system's schema and writers, for adoption tests and the bench.
* `legacy_trainer`: models logged the way the old trainer logs them, and the old predictor's
  mapping as an oracle.
* `restart_time`: process start to first prediction, with a warm and a cold model cache.
"""
