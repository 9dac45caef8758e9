"""The allow-list's matching rules and the JSON model document (pure logic)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sensor_predictor.config import ConfigError, load_settings
from sensor_predictor.kmeans_kernel import KMeansKernel
from sensor_predictor.model_sources import (
    SourcePolicy,
    SourceRefused,
    model_document,
    parse_model_document,
)

SERVER = "http://mlflow:5000"


@pytest.mark.parametrize(("uri", "allowed"), [
    ("mlflow-artifacts:/1/abc/artifacts", True),  # served by the tracking server
    ("mlflow-artifacts://mlflow:5000/1/abc/artifacts", True),
    ("mlflow-artifacts://evil:5000/1/abc/artifacts", False),
    ("http://MLFLOW:5000/api/2.0/mlflow-artifacts/x", True),
    ("http://user:pw@mlflow:5000/x", True),  # credentials are not part of the location
    ("http://mlflow:50001/x", False),  # a prefix ends at a path boundary
    ("http://mlflow:5000.evil.example/x", False),
    ("s3://models/run/artifacts", False),
    ("file:///mlflow/artifacts/1/abc", False),
    ("/tmp/anything", False),
])
def test_default_policy_of_a_tracking_server(uri: str, allowed: bool) -> None:
    assert SourcePolicy(SERVER).allows(uri) is allowed


def test_a_local_store_allows_its_own_folder_only() -> None:
    policy = SourcePolicy("sqlite:////srv/mlflow/mlflow.db")
    assert policy.allows("file:///srv/mlflow/mlruns/1/abc/artifacts")
    assert policy.allows("/srv/mlflow/mlruns/1")
    assert not policy.allows("file:///srv/mlflow/../other/1")
    assert not policy.allows("file:///srv/mlflow-other/1")
    assert not policy.allows("file:///tmp/x")


def test_the_operators_list_replaces_the_default() -> None:
    policy = SourcePolicy(SERVER, ("http://mlflow:5000", "s3://models/prod/"))
    assert policy.allows("s3://models/prod/run/artifacts")
    assert not policy.allows("s3://models/prod-evil/run")
    assert not policy.allows("s3://models/dev/run")
    with pytest.raises(SourceRefused) as refused:
        policy.check("s3://u:secret@models/dev/run", "the artifacts of run r")
    assert refused.value.reason == "source_not_allowed" and "secret" not in str(refused.value)


def test_model_sources_allowed_setting() -> None:
    assert load_settings({}).model_sources_allowed == ()
    assert load_settings({"MODEL_SOURCES_ALLOWED": "http://mlflow:5000, s3://m/p"}
                         ).model_sources_allowed == ("http://mlflow:5000", "s3://m/p")
    for everything in ("*", "file:///", "https://"):
        with pytest.raises(ConfigError, match="would allow everything"):
            load_settings({"MODEL_SOURCES_ALLOWED": everything})


def _kernel() -> KMeansKernel:
    rng = np.random.default_rng(0)
    return KMeansKernel(rng.normal(size=3), rng.uniform(1, 2, size=3), rng.normal(size=(2, 3)))


def test_the_json_model_round_trips_and_refuses_what_does_not_fit() -> None:
    kernel = _kernel()
    raw = json.dumps(model_document(["a", "b", "c"], 2, [0.4, 0.6], kernel)).encode()
    parsed = parse_model_document(raw)
    x = np.random.default_rng(1).normal(size=(20, 3))
    assert parsed.feature_names == ("a", "b", "c") and parsed.reference == (0.4, 0.6)
    assert (parsed.kernel.predict(x)[0] == kernel.predict(x)[0]).all()
    good = json.loads(raw)
    for damage in (
        lambda d: d.update(format=2),
        lambda d: d.update(feature_names=["a", "a", "c"]),
        lambda d: d.update(feature_names=["a", "b"]),
        lambda d: d.update(n_clusters=3),
        lambda d: d["kernel"].update(scale=[1.0, 0.0, 1.0]),
        lambda d: d["kernel"].update(columns=[0, 1, 2]),
    ):
        document = json.loads(json.dumps(good))
        damage(document)
        with pytest.raises(ValueError, match=r"\w"):
            parse_model_document(json.dumps(document).encode())
    with pytest.raises(ValueError, match="not JSON"):
        parse_model_document(b"\x80\x04pickle")
