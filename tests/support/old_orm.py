"""The old system's ORM models (Tortoise, as its consumer defines them): generate_schemas() on
an empty database gives exactly devtools/old_system_schema.sql. The statements its consumer and
predictor send are in sensor_predictor.devtools.old_system."""

from __future__ import annotations

import datetime as dt

from tortoise import fields, models

from sensor_predictor.devtools.old_system import MODEL_NAME

# -- the old ORM's models, for Tortoise.generate_schemas() ----------------------------------------


class Machine(models.Model):
    id = fields.IntField(primary_key=True)
    machine_id = fields.CharField(max_length=36, unique=True)
    first_seen = fields.DatetimeField(auto_now_add=True)
    last_seen = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "machines"


class Failure(models.Model):
    id = fields.IntField(primary_key=True)
    start_time = fields.DatetimeField(auto_now_add=True)
    end_time = fields.DatetimeField(null=True)
    is_active = fields.BooleanField(default=True)
    machine: fields.ForeignKeyRelation[Machine] = fields.ForeignKeyField(
        "models.Machine", related_name="failures", on_delete=fields.CASCADE)

    class Meta:
        table = "failures"


class Reading(models.Model):
    id = fields.IntField(primary_key=True)
    timestamp = fields.DatetimeField()
    values = fields.JSONField()
    failure: fields.ForeignKeyNullableRelation[Failure] = fields.ForeignKeyField(
        "models.Failure", related_name="readings", null=True, on_delete=fields.SET_NULL)
    machine: fields.ForeignKeyRelation[Machine] = fields.ForeignKeyField(
        "models.Machine", related_name="readings", on_delete=fields.CASCADE)

    class Meta:
        table = "readings"


class Prediction(models.Model):
    id = fields.IntField(primary_key=True)
    cluster_id = fields.IntField()
    model_version = fields.CharField(max_length=50)
    confidence_score = fields.FloatField(null=True)
    prediction_time = fields.DatetimeField(auto_now_add=True)
    mlflow_run_id = fields.CharField(max_length=50, null=True)
    model_name = fields.CharField(max_length=100, null=True, default=MODEL_NAME)
    reading: fields.ForeignKeyRelation[Reading] = fields.ForeignKeyField(
        "models.Reading", related_name="predictions", on_delete=fields.CASCADE)

    class Meta:
        table = "predictions"
        unique_together = (("reading", "model_version"),)


class Cluster(models.Model):
    id = fields.IntField(primary_key=True)
    mlflow_run_id = fields.CharField(max_length=36, unique=True)
    mlflow_model_version = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)
    is_active = fields.BooleanField(default=False)
    n_clusters = fields.IntField()
    silhouette_score = fields.FloatField()
    cluster_profiles = fields.JSONField()

    class Meta:
        table = "clusters"


class Version(models.Model):
    id = fields.IntField(primary_key=True)
    version = fields.CharField(max_length=50)
    run_id = fields.CharField(max_length=50)
    created_at = fields.DatetimeField(auto_now_add=True)
    is_processed = fields.BooleanField(default=False)

    class Meta:
        table = "versions"


class Drift(models.Model):
    id = fields.IntField(primary_key=True)
    detection_time = fields.DatetimeField(auto_now_add=True)
    drift_score = fields.FloatField()
    reference_distribution = fields.JSONField()
    current_distribution = fields.JSONField()

    class Meta:
        table = "drift"


async def generate_schemas(dsn: str) -> None:
    """What the old consumer runs at every start."""
    from tortoise import Tortoise

    await Tortoise.init(db_url=dsn, modules={"models": [__name__]})
    try:
        await Tortoise.generate_schemas(safe=True)
    finally:
        await Tortoise.close_connections()


async def orm_write_reading(dsn: str, machine: str, values: dict[str, float]) -> int:
    """One reading written through the old ORM itself (Reading.create)."""
    from tortoise import Tortoise

    await Tortoise.init(db_url=dsn, modules={"models": [__name__]})
    try:
        m, _ = await Machine.get_or_create(machine_id=machine)
        r = await Reading.create(timestamp=dt.datetime.now(dt.UTC), values=values, machine=m)
        return int(r.id)
    finally:
        await Tortoise.close_connections()
