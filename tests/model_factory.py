"""Models the trainer would never log: for tests of what the worker refuses."""

from __future__ import annotations

import numpy as np

from sensor_predictor.model_contract import MODEL_ARTIFACT, model_metadata


def log_model_with_features(tracking_uri: str, feature_names: list[str]) -> tuple[str, int]:
    """A valid scaler + KMeans pipeline whose feature names no reading carries."""
    import mlflow
    import sklearn
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("sensor-predictor tests")
    rng = np.random.default_rng(0)
    pipeline = Pipeline([("scaler", StandardScaler()),
                         ("kmeans", KMeans(n_clusters=3, n_init=2, random_state=0))])
    pipeline.fit(rng.normal(size=(300, len(feature_names))))
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(
            pipeline, name=MODEL_ARTIFACT,
            registered_model_name="sensor_predictor_test_wrong_features",
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            metadata=model_metadata(feature_names, [1 / 3] * 3, 3))
    return run.info.run_id, int(info.registered_model_version)
