"""Simulated machines: `generator` (the pure stream) and `writer` (into PostgreSQL).

The names of both are re-exported here for the callers of the former single module; the writer's
are imported on first use, so importing the generator pulls in no database driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sensor_predictor.simulator.generator import (
    FEATURE_NAMES,
    SIGNATURES,
    Block,
    FailureSignature,
    Reading,
    Simulator,
    generate_feature_matrix,
)

if TYPE_CHECKING:
    from sensor_predictor.simulator.writer import ConnectionFactory, machine_name, run_simulation

__all__ = [
    "FEATURE_NAMES",
    "SIGNATURES",
    "Block",
    "ConnectionFactory",
    "FailureSignature",
    "Reading",
    "Simulator",
    "generate_feature_matrix",
    "machine_name",
    "run_simulation",
]

_WRITER_NAMES = frozenset({"ConnectionFactory", "machine_name", "run_simulation"})


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        from sensor_predictor.simulator import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
