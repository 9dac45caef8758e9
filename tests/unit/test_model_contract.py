"""The model contract: version labels, and the old trainer's feature layout and reading mapping."""

from __future__ import annotations

import json

import pytest

from sensor_predictor.model_contract import (
    FEATURE_NAMES,
    legacy_columns,
    legacy_feature_order,
    legacy_order_from_keys,
    legacy_profile_order,
    legacy_sensors,
    parse_legacy_feature,
    profile_feature_sets,
    version_label,
)


def test_version_label_is_the_registered_version_else_the_run() -> None:
    assert version_label("abc", 7) == "7"
    assert version_label("abc", None) == "run-abc"
    assert len(version_label("x" * 80, None)) == 50


def test_the_old_trainers_order_string_sorts_sensors_then_duration() -> None:
    order = legacy_feature_order(FEATURE_NAMES)
    assert len(order) == 81
    assert order[:6] == ("Sensor 1_mean", "Sensor 1_std", "Sensor 1_min", "Sensor 1_max",
                         "Sensor 10_mean", "Sensor 10_std")
    sensors = [o.rpartition("_")[0] for o in order[:-1:4]]
    assert sensors[:4] == ["Sensor 1", "Sensor 10", "Sensor 11", "Sensor 12"]
    assert sensors[10:13] == ["Sensor 19", "Sensor 2", "Sensor 20"]
    assert sensors[-1] == "Sensor 9"
    assert order[-1] == "duration"


def test_the_rule_rebuilt_from_unordered_keys_is_the_trainers_order() -> None:
    order = legacy_feature_order(FEATURE_NAMES)
    shuffled = sorted(order, key=lambda k: (len(k), k[::-1]))  # jsonb-like: any order
    assert legacy_order_from_keys(shuffled) == order


def test_profile_order_keeps_the_files_order() -> None:
    order = legacy_feature_order(["b", "a"])
    text = json.dumps({"cluster_0": {"size": 3, "all_features": {k: 0.0 for k in order}},
                       "cluster_1": {"size": 1, "all_features": {}}})
    assert legacy_profile_order(json.loads(text)) == order
    assert legacy_profile_order({"cluster_0": {"size": 1}}) is None


def test_a_reading_fills_mean_min_max_with_its_value_and_std_duration_with_zero() -> None:
    order = legacy_feature_order(["Sensor 2", "Sensor 10"])
    sensors, columns = legacy_columns(order)
    assert sensors == ("Sensor 10", "Sensor 2") == legacy_sensors(order)
    assert columns == (0, -1, 0, 0, 1, -1, 1, 1, -1)


def test_a_feature_the_mapping_cannot_fill_is_refused() -> None:
    with pytest.raises(ValueError, match="Sensor 1_median"):
        legacy_columns(("Sensor 1_mean", "Sensor 1_median", "duration"))
    assert parse_legacy_feature("duration") is None
    assert parse_legacy_feature("Sensor_1_std") == ("Sensor_1", "std")


def test_profile_feature_sets_read_both_layouts() -> None:
    ours = {"0": {"Sensor 1": 0.1, "Sensor 2": 0.2}}
    theirs = {"cluster_0": {"size": 2, "distinctive_features": ["x"],
                            "all_features": {"x_mean": 1.0, "duration": 3.0}}}
    assert profile_feature_sets(ours) == [frozenset({"Sensor 1", "Sensor 2"})]
    assert profile_feature_sets(theirs) == [frozenset({"x_mean", "duration"})]
