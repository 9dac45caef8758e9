"""The shipped alerting rules, end to end: a real worker scraped by Debian's `prometheus`, which
evaluates deploy/prometheus/rules and sends to Debian's `prometheus-alertmanager` running
deploy/alertmanager/alertmanager.yml, whose webhook receivers post to a small HTTP server in this
test. A drift excursion reaches the webhook as a firing alert and, once it closes, as resolved;
a killed worker reaches it as a firing SensorPredictorDown.

What the test changes in the shipped files, to run in a minute: every `for:` of the rules
becomes 1 s (their expressions are the shipped ones, byte for byte) except
SensorPredictorAbsent's (at 1 s it fires in the second before Prometheus' first scrape; promtool
tests it), the scrape and evaluation
intervals are 1 s, Alertmanager's group_wait 0 s and group_interval 1 s, and the receivers'
URLs point here. `--rules.alert.resend-delay=1s`: Prometheus drops an alert it sends before it
has discovered Alertmanager, and sends it again only after that delay (1 minute by default)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from sensor_predictor.devtools.postgres import free_port
from sensor_predictor.devtools.tally import tally
from sensor_predictor.simulator import Simulator
from sensor_predictor.training import activate_model
from tests.support.deploy_files import DEPLOY
from tests.support.fixtures import WorkerFactory
from tests.support.models import Models
from tests.support.readings import insert_readings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.asyncio

RULES = DEPLOY / "prometheus" / "rules"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
WINDOW = 100
SHORT_FOR = "1s"
KEEP_FOR = {"SensorPredictorAbsent"}


# -- the webhook receiver ----------------------------------------------------------------------


@dataclass
class Webhook:
    """Alertmanager's webhook posts, as received (path, JSON body)."""

    port: int = 0
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        """Every alert of that name and status delivered so far (one per post it was in)."""
        with self.lock:
            return [a for _, body in self.posts for a in body["alerts"]
                    if a["labels"].get("alertname") == name and a["status"] == status]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with hook.lock:
                hook.posts.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


# -- Prometheus and Alertmanager ---------------------------------------------------------------


def _tool(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise AssertionError(f"none of {names} on PATH: install Debian's prometheus and "
                         "prometheus-alertmanager")


def shortened_rules(target: Path) -> list[Path]:
    """The shipped rule files with every `for:` at SHORT_FOR (but KEEP_FOR's), nothing else
    changed."""
    out = []
    for path in sorted(RULES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "for" in rule and rule.get("alert") not in KEEP_FOR:
                    rule["for"] = SHORT_FOR
        rendered = target / path.name
        rendered.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        out.append(rendered)
    return out


def alertmanager_config(hook: Webhook) -> dict[str, Any]:
    """The shipped config, its receivers pointed at `hook` and its timers shortened."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))
    for receiver in config["receivers"]:
        for webhook_config in receiver.get("webhook_configs", []):
            path = "/" + webhook_config["url"].split("/", 3)[3]
            webhook_config["url"] = hook.url(path)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="0s", group_interval="1s", repeat_interval="1h")
    return config


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _start(args: list[str], log: Path, ready_url: str, timeout: float = 30) -> Process:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    p = Process(proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{args[0]} exited:\n{p.tail()}"
        try:
            with urllib.request.urlopen(ready_url, timeout=1) as r:
                if r.status == 200:
                    return p
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{args[0]} not ready in {timeout} s:\n{p.tail()}")


@pytest.fixture
def start_monitoring(tmp_path: Path, webhook: Webhook
                     ) -> Iterator[Callable[[int], tuple[str, str]]]:
    """Starts Alertmanager, then Prometheus scraping a worker's metrics port; gives the
    worker's instance label and Prometheus' URL."""
    started: list[Process] = []

    def start(worker_port: int) -> tuple[str, str]:
        am_port, prom_port = free_port(), free_port()
        am_dir = tmp_path / "alertmanager"
        am_dir.mkdir()
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(webhook)))
        started.append(_start(
            [_tool("prometheus-alertmanager", "alertmanager"),
             f"--config.file={am_dir / 'alertmanager.yml'}", f"--storage.path={am_dir}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            tmp_path / "alertmanager.log", f"http://127.0.0.1:{am_port}/-/ready"))

        prom_dir = tmp_path / "prometheus"
        (prom_dir / "rules").mkdir(parents=True)
        rules = shortened_rules(prom_dir / "rules")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(r) for r in rules],
            "alerting": {"alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{
                "job_name": "sensor-predictor", "scrape_timeout": "900ms",
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        started.append(_start(
            [_tool("prometheus"), f"--config.file={prom_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={prom_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--rules.alert.resend-delay=1s"],
            tmp_path / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready"))
        return f"127.0.0.1:{worker_port}", f"http://127.0.0.1:{prom_port}"

    yield start
    for p in reversed(started):
        p.proc.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


# -- the scenario ------------------------------------------------------------------------------


async def _feed(conn: asyncpg.Connection, sim: Simulator, n: int, step: int = 10) -> None:
    """Insert n readings in statements of `step`, each scored before the next is written."""
    for _ in range(0, n, step):
        await insert_readings(conn, [r.values for r in sim.next_batch(step)])
        await wait_until(lambda: _scored(conn), "readings scored", timeout=10, interval=0.01)


async def _scored(conn: asyncpg.Connection) -> bool:
    return (await tally(conn)).missing == 0


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _shipped_groups() -> list[dict[str, Any]]:
    return [g for path in sorted(RULES.glob("*.yaml"))
            for g in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]]


async def _gauge(worker: Any, name: str, value: float) -> bool:
    return bool(await asyncio.to_thread(worker.metric, name) == value)


async def _delivered(hook: Webhook, name: str, status: str) -> list[dict[str, Any]]:
    return hook.alerts(name, status)


@pytest.mark.timeout(180)
async def test_drift_and_a_killed_worker_reach_the_webhook_and_drift_resolves(
        conn: asyncpg.Connection, models: Models, worker_factory: WorkerFactory,
        webhook: Webhook, start_monitoring: Callable[[int], tuple[str, str]]) -> None:
    await activate_model(conn, *models.v1)
    worker = worker_factory(DRIFT_DETECTION_WINDOW=str(WINDOW), DRIFT_THRESHOLD="0.1").start()
    await worker.until_ready()
    instance, prometheus = await asyncio.to_thread(start_monitoring, worker.metrics_port)

    # The path works (Watchdog, always firing, reaches its own receiver), and a healthy worker
    # raises nothing: no alert of ours fires before the excursion.
    await wait_until(lambda: _delivered(webhook, "Watchdog", "firing"), "Watchdog delivered",
                     timeout=30)
    await _feed(conn, Simulator(machines=10, seed=11), 300)
    assert not [a for _, body in webhook.posts for a in body["alerts"]
                if a["labels"]["alertname"] != "Watchdog"], webhook.posts

    # A drift excursion: firing at the webhook, with the instance and the score.
    shifted = Simulator(machines=10, seed=12, drift=True)
    shift_at = time.monotonic()
    await _feed(conn, shifted, WINDOW)
    await wait_until(lambda: _gauge(worker, "sensor_drift_detected", 1), "drift open",
                     timeout=5)
    score = worker.metric("sensor_drift_score")
    (firing, *_) = await wait_until(
        lambda: _delivered(webhook, "SensorPredictorDriftDetected", "firing"),
        "drift alert delivered", timeout=30)
    fired_after = time.monotonic() - shift_at
    assert firing["labels"]["instance"] == instance
    assert firing["labels"]["severity"] == "warning"
    assert firing["annotations"]["runbook_url"] == \
        "docs/runbooks.md#sensorpredictordriftdetected"
    assert instance in firing["annotations"]["description"]
    shown = float(firing["annotations"]["summary"].rsplit("score ", 1)[1].rstrip("."))
    assert shown > 0.1 and shown == pytest.approx(score, abs=0.05)
    assert not webhook.alerts("SensorPredictorDriftDetected", "resolved")

    # Back to normal: the excursion closes, and the webhook gets the resolved message.
    await _feed(conn, Simulator(machines=10, seed=13), 3 * WINDOW)
    await wait_until(lambda: _gauge(worker, "sensor_drift_detected", 0), "drift closed",
                     timeout=5)
    (resolved, *_) = await wait_until(
        lambda: _delivered(webhook, "SensorPredictorDriftDetected", "resolved"),
        "drift resolved delivered", timeout=30)
    assert resolved["labels"]["instance"] == instance
    assert resolved["endsAt"] > firing["startsAt"]

    # Every rule evaluated without error against the real worker's series (a template, or a
    # vector matching that only fails on real labels, would show here).
    rules = await asyncio.to_thread(_get_json, f"{prometheus}/api/v1/rules")
    evaluated = [r for g in rules["data"]["groups"] for r in g["rules"]]
    assert len(evaluated) == sum(len(g["rules"]) for g in _shipped_groups())
    assert [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"] == []

    # A killed worker: SensorPredictorDown, critical, for its instance.
    worker.signal(signal.SIGKILL)
    worker.wait()
    killed_at = time.monotonic()
    (down, *_) = await wait_until(
        lambda: _delivered(webhook, "SensorPredictorDown", "firing"), "down alert delivered",
        timeout=30)
    assert down["labels"]["instance"] == instance
    assert down["labels"]["severity"] == "critical"
    assert instance in down["annotations"]["summary"]
    print(f"alerting e2e: drift alert at the webhook {fired_after:.1f} s after the shift began, "
          f"Down {time.monotonic() - killed_at:.1f} s after the kill")
