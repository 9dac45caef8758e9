"""Simulated machines: a stationary stream of sensor readings with failure episodes. No I/O.

`Simulator` and `generate_feature_matrix` are pure (numpy only); `writer.py` writes the stream
to PostgreSQL.

Every sensor follows a mean-reverting random walk (a discretised Ornstein-Uhlenbeck process,
`x += THETA * (mu - x) + sigma * noise`) around its machine's mean. Machines come in four
operating profiles; machines are interleaved round-robin, so every window of readings holds each
machine (and so each profile) equally often and the mix of a window is nearly constant. The
means, spreads and profiles are constants, not drawn from the seed: a model trained on one
simulated stream sees the same distribution in any other with as many machines (any seed), nearly
the same with any four or more, and reports no drift. One to three machines lack profiles, and a
model trained on ten rightly reports drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from sensor_predictor.model_contract import FEATURE_NAMES

__all__ = [
    "FEATURE_NAMES",
    "SIGNATURES",
    "Block",
    "FailureSignature",
    "Reading",
    "Simulator",
    "generate_feature_matrix",
]

N_SENSORS = len(FEATURE_NAMES)

FailureSignature = Literal["sensor9_high", "sensor9_low", "sensors2_13"]
# Index in this tuple is the signature code used in Block.signatures.
SIGNATURES: tuple[FailureSignature, ...] = ("sensor9_high", "sensor9_low", "sensors2_13")

# Share of the gap to the mean closed each step: the lag-1 autocorrelation is 1 - THETA.
THETA = 0.3
_sensor = np.arange(1, N_SENSORS + 1, dtype=np.float64)
# Per-sensor means (within +-0.1) and stationary standard deviations (0.20-0.26).
MEANS: npt.NDArray[np.float64] = np.round(0.1 * np.sin(1.7 * _sensor), 3)
SPREADS: npt.NDArray[np.float64] = 0.20 + 0.03 * (_sensor % 3)
# The noise scale that gives SPREADS as the stationary deviation of the AR(1) recursion.
_SIGMAS = SPREADS * math.sqrt(1.0 - (1.0 - THETA) ** 2)

# Machines come in four operating profiles (machine index modulo 4), which shift two groups of
# sensors up or down. They are what the clusters of a model trained on this stream find, and
# since every window of round-robin readings holds each machine equally often, the cluster
# proportions of a window barely move: far less than sampling noise alone would make them.
PROFILE_GROUPS = (slice(3, 8), slice(14, 19))  # Sensors 4-8 and Sensors 15-19
PROFILE_OFFSET = 0.3
PROFILES: npt.NDArray[np.float64] = np.zeros((4, N_SENSORS))
for _p, (_a, _b) in enumerate(((-1, -1), (-1, 1), (1, -1), (1, 1))):
    PROFILES[_p, PROFILE_GROUPS[0]] = _a * PROFILE_OFFSET
    PROFILES[_p, PROFILE_GROUPS[1]] = _b * PROFILE_OFFSET

# Failure episodes: a machine not in one starts one with this probability at each of its
# readings; it lasts a uniform number of that machine's readings.
EPISODE_START_PROBABILITY = 0.002
EPISODE_READINGS = (5, 30)
_S2, _S9, _S13 = 1, 8, 12  # column indices of Sensors 2, 9 and 13
# What each signature pulls towards: {column: target}.
_SIGNATURE_TARGETS: tuple[dict[int, float], ...] = (
    {_S9: 0.9},
    {_S9: -0.9},
    {_S2: 0.8, _S13: -0.8},
)

# Drift: the first sensor group runs hotter (machines of the "low" profiles look like the
# "high" ones), and episodes come five times as often.
DRIFT_SENSORS = PROFILE_GROUPS[0]
DRIFT_SHIFT = 0.5
DRIFT_EPISODE_FACTOR = 5.0

# Rounds (one reading from every machine) generated at a time.
_CHUNK_ROUNDS = 256


@dataclass(frozen=True, slots=True)
class Reading:
    """One simulated reading."""

    index: int
    """Position in the stream, from 0."""
    machine: int
    """Machine index, from 0 (round-robin)."""
    values: dict[str, float]
    """Sensor name to value, in FEATURE_NAMES order."""
    episode: int | None
    """The failure episode the reading belongs to (unique per simulator), else None."""
    signature: FailureSignature | None
    """The episode's signature, else None."""

    @property
    def in_episode(self) -> bool:
        return self.episode is not None


@dataclass(frozen=True, slots=True)
class Block:
    """Consecutive simulated readings as arrays (the fast form of a list of Reading)."""

    start: int
    """Stream index of the first row."""
    values: npt.NDArray[np.float64]
    """(n, 20), columns in FEATURE_NAMES order."""
    machines: npt.NDArray[np.int64]
    """(n,) machine index of each row."""
    episodes: npt.NDArray[np.int64]
    """(n,) episode number, -1 outside episodes."""
    signatures: npt.NDArray[np.int64]
    """(n,) index into SIGNATURES, -1 outside episodes."""

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def readings(self) -> list[Reading]:
        out: list[Reading] = []
        for i, (row, machine, episode, sig) in enumerate(zip(
                self.values.tolist(), self.machines.tolist(), self.episodes.tolist(),
                self.signatures.tolist(), strict=True)):
            out.append(Reading(
                index=self.start + i, machine=machine,
                values=dict(zip(FEATURE_NAMES, row, strict=True)),
                episode=None if episode < 0 else episode,
                signature=None if sig < 0 else SIGNATURES[sig]))
        return out


class Simulator:
    """A seeded stream of readings from `machines` machines, taken round-robin."""

    def __init__(self, machines: int, seed: int | None, drift: bool = False) -> None:
        if machines < 1:
            raise ValueError(f"machines must be >= 1, got {machines}")
        self.machines = int(machines)
        self.drift = bool(drift)
        self._rng = np.random.default_rng(seed)
        m = self.machines
        # (machines, sensors): each machine's own means.
        self._means = MEANS + PROFILES[np.arange(m) % len(PROFILES)]
        self._p_start = EPISODE_START_PROBABILITY
        if drift:
            self._means[:, DRIFT_SENSORS] += DRIFT_SHIFT
            self._p_start *= DRIFT_EPISODE_FACTOR
        # Start from the stationary distribution: no warm-up transient.
        self._x = self._means + SPREADS * self._rng.standard_normal((m, N_SENSORS))
        self._left = np.zeros(m, dtype=np.int64)  # readings left in each machine's episode
        self._episode = np.full(m, -1, dtype=np.int64)
        self._signature = np.full(m, -1, dtype=np.int64)
        self._next_episode = 0
        self._emitted = 0
        self._pending: Block | None = None

    @property
    def emitted(self) -> int:
        """Readings handed out so far."""
        return self._emitted

    def next_batch(self, n: int) -> list[Reading]:
        """The next n readings."""
        return self.next_block(n).readings()

    def next_block(self, n: int) -> Block:
        """The next n readings as arrays; the stream does not depend on how it is sliced."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        parts: list[Block] = []
        need = n
        while need > 0:
            if self._pending is None or len(self._pending) == 0:
                self._pending = self._generate_chunk()
            take = min(need, len(self._pending))
            parts.append(_slice(self._pending, 0, take))
            self._pending = _slice(self._pending, take, len(self._pending))
            need -= take
        start = self._emitted
        self._emitted += n
        if not parts:
            return Block(start, np.empty((0, N_SENSORS)), *(np.empty(0, np.int64),) * 3)
        return Block(
            start,
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.machines for p in parts]),
            np.concatenate([p.episodes for p in parts]),
            np.concatenate([p.signatures for p in parts]))

    def _generate_chunk(self) -> Block:
        """_CHUNK_ROUNDS rounds: each machine's next reading, machine 0 first in each round."""
        k, m, rng = _CHUNK_ROUNDS, self.machines, self._rng
        starts = rng.random((k, m)) < self._p_start
        noise = rng.standard_normal((k, m, N_SENSORS)) * _SIGMAS
        episodes = np.full((k, m), -1, dtype=np.int64)
        signatures = np.full((k, m), -1, dtype=np.int64)
        # Episode schedule: a Python loop over episodes only (they are rare), machine by machine.
        new: list[tuple[int, int, int, int]] = []  # (round, machine, signature, length)
        for j in range(m):
            t = 0
            left = int(self._left[j])
            if left > 0:  # an episode carried over from the previous chunk
                span = min(left, k)
                episodes[:span, j] = self._episode[j]
                signatures[:span, j] = self._signature[j]
                left -= span
                t = span
            while t < k:
                hits = np.flatnonzero(starts[t:, j])
                if hits.size == 0:
                    break
                t0 = t + int(hits[0])
                sig = int(rng.integers(len(SIGNATURES)))
                length = int(rng.integers(EPISODE_READINGS[0], EPISODE_READINGS[1] + 1))
                new.append((t0, j, sig, length))
                span = min(length, k - t0)
                signatures[t0:t0 + span, j] = sig
                episodes[t0:t0 + span, j] = -2  # numbered below, in stream order
                left = length - span
                t = t0 + span
            self._left[j] = left
        for t0, j, sig, length in sorted(new):
            number = self._next_episode
            self._next_episode += 1
            episodes[t0:t0 + min(length, k - t0), j] = number
            if t0 + length > k:
                self._episode[j], self._signature[j] = number, sig
        # The mean each step reverts to: the sensor's own, or the failure signature's target.
        targets = np.broadcast_to(self._means, (k, m, N_SENSORS)).copy()
        for code, pulls in enumerate(_SIGNATURE_TARGETS):
            mask = signatures == code
            for column, target in pulls.items():
                targets[mask, column] = target
        # x_t = (1 - THETA) x_{t-1} + THETA target_t + noise_t, unrolled over the rounds.
        drive = THETA * targets + noise
        values = np.empty_like(drive)
        x = self._x
        for t in range(k):
            x = (1.0 - THETA) * x + drive[t]
            values[t] = x
        self._x = x
        return Block(
            0,
            values.reshape(k * m, N_SENSORS),
            np.tile(np.arange(m, dtype=np.int64), k),
            episodes.reshape(k * m),
            signatures.reshape(k * m))


def _slice(block: Block, lo: int, hi: int) -> Block:
    return Block(block.start + lo, block.values[lo:hi], block.machines[lo:hi],
                 block.episodes[lo:hi], block.signatures[lo:hi])


def generate_feature_matrix(
    n: int, machines: int = 10, seed: int | None = 0, drift: bool = False
) -> npt.NDArray[np.float64]:
    """n simulated readings as a float64 (n, 20) matrix, columns in FEATURE_NAMES order."""
    return np.ascontiguousarray(Simulator(machines, seed, drift).next_block(n).values,
                                dtype=np.float64)
