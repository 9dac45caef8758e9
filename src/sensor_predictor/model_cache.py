"""The local cache of verified models: a restarted worker serves without MLflow or scikit-learn.

One JSON file per model, named by a hash of (tracking URI, run id, registered version) and
holding the numpy predictor's arrays and what the holder needs besides (feature names, cluster
count, drift reference, version label). A run's artifacts never change in MLflow, so an entry
stays true; the key's tracking URI keeps two MLflow servers apart.

Writes are atomic (a temporary file in the same folder, fsynced, renamed over the entry): a
crash leaves the old entry or the new one, never half of one. An entry that cannot be read,
fails its checksum or does not match its key is discarded with a warning, and the model is
fetched from MLflow as if it had never been cached. The newest KEEP_ENTRIES entries are kept.

The folder is trusted only when this process's user owns it and nobody else may write to it
(no group or other write bit); otherwise the cache is refused as a whole (logged once as
`model_cache_refused` with its reason) and every model is fetched from MLflow. The same holds
for each entry file. What the sha256 in an entry protects: against a torn or corrupted file,
and an entry of another model put in its place. What it does not: anyone who can write the
folder can write a new entry with a matching checksum (it is not a signature), which is why
the folder's owner and mode are checked, and why the cache stores no pickle: an entry is
arrays and names read with json, so the most a forged entry can do is serve wrong centroids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sensor_predictor.model_cache")

FORMAT = 1
KEEP_ENTRIES = 16
SUFFIX = ".model.json"


@dataclass(frozen=True)
class CacheEntry:
    run_id: str
    registered_version: int | None
    version_label: str
    feature_names: tuple[str, ...]
    model_features: tuple[str, ...]
    n_clusters: int
    reference: tuple[float, ...] | None
    legacy: bool
    kernel: dict[str, Any]
    artifact_digest: str | None = None
    """The digest of the MLflow artifacts it was built from (model_sources.py)."""
    feature_reference: dict[str, Any] | None = None
    """The per-feature drift reference (feature_drift.FeatureReference.to_json()); None in
    entries written before it existed."""


def entry_from_json(body: dict[str, Any]) -> CacheEntry:
    """An entry from its JSON form (`asdict(entry)`, as stored here and as the fetch process
    hands a model back, model_fetch.py); KeyError, TypeError or ValueError when it is not one."""
    reference = body["reference"]
    return CacheEntry(
        run_id=str(body["run_id"]), registered_version=body["registered_version"],
        version_label=str(body["version_label"]),
        feature_names=tuple(str(n) for n in body["feature_names"]),
        model_features=tuple(str(n) for n in body["model_features"]),
        n_clusters=int(body["n_clusters"]),
        reference=None if reference is None else tuple(float(p) for p in reference),
        legacy=bool(body["legacy"]), kernel=dict(body["kernel"]),
        artifact_digest=None if body.get("artifact_digest") is None
        else str(body["artifact_digest"]),
        feature_reference=(None if body.get("feature_reference") is None
                           else dict(body["feature_reference"])))


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class ModelCache:
    """Entries for one tracking URI, in `directory` (created on first write)."""

    def __init__(self, directory: str | Path, tracking_uri: str,
                 keep: int = KEEP_ENTRIES) -> None:
        self.directory = Path(directory).expanduser()
        self.tracking_uri = tracking_uri
        self.keep = keep
        self._write_failed = False
        self._refused: str | None = None

    def refusal(self) -> str | None:
        """Why the folder is not trusted (a stable reason), or None. Logged once per reason."""
        reason, detail = _untrusted(self.directory)
        if reason is not None and reason != self._refused:
            log.warning("model_cache_refused", directory=str(self.directory), reason=reason,
                        detail=detail, note="serving without a cache: models are fetched from "
                        "MLflow; fix the folder (owned by this user, mode 0700) to use it")
        self._refused = reason
        return reason

    def path(self, run_id: str, registered_version: int | None) -> Path:
        key = json.dumps([self.tracking_uri, run_id, registered_version])
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + SUFFIX)

    def load(self, run_id: str, registered_version: int | None) -> CacheEntry | None:
        """The entry, or None (absent; or unreadable, then discarded with a warning)."""
        if self.refusal() is not None:
            return None
        path = self.path(run_id, registered_version)
        reason, detail = _untrusted(path, folder=False)
        if reason is not None:
            self.discard(run_id, registered_version, f"{reason}: {detail}")
            return None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("model_cache_unreadable", path=str(path), error=str(exc),
                        note="fetching the model from MLflow instead")
            return None
        try:
            data = json.loads(raw)
            body = data["entry"]
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
            if data.get("checksum") != _checksum(body):
                raise ValueError("checksum mismatch")
            if (body["tracking_uri"], body["run_id"], body["registered_version"]) != (
                    self.tracking_uri, run_id, registered_version):
                raise ValueError("the entry is another model's")
            entry = entry_from_json(body)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.discard(run_id, registered_version, f"{type(exc).__name__}: {exc}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept when older entries are pruned
        return entry

    def discard(self, run_id: str, registered_version: int | None, why: str) -> None:
        path = self.path(run_id, registered_version)
        log.warning("model_cache_unreadable", path=str(path), error=why[:300],
                    note="entry discarded; fetching the model from MLflow instead")
        with contextlib.suppress(OSError):
            path.unlink()

    def store(self, entry: CacheEntry) -> bool:
        """Write atomically; False (logged once) when the folder is not writable."""
        body = {"tracking_uri": self.tracking_uri, **asdict(entry)}
        document = {"format": FORMAT, "checksum": _checksum(json.loads(json.dumps(body))),
                    "entry": body}
        path = self.path(entry.run_id, entry.registered_version)
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.refusal() is not None:
                return False
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(self.directory)
        except OSError as exc:
            if not self._write_failed:
                log.warning("model_cache_not_writable", directory=str(self.directory),
                            error=str(exc), note="restarts fetch the model from MLflow")
            self._write_failed = True
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._prune(keep=path)
        log.info("model_cached", run_id=entry.run_id, model_version=entry.version_label,
                 path=str(path))
        return True

    def _prune(self, keep: Path) -> None:
        try:
            entries = [p for p in self.directory.glob("*" + SUFFIX)
                       if not p.name.startswith(".")]
            entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return
        for old in entries[self.keep:]:
            if old != keep:
                with contextlib.suppress(OSError):
                    old.unlink()


def _untrusted(path: Path, folder: bool = True) -> tuple[str | None, str]:
    """(reason, detail) when `path` may have been written by someone else; (None, "") when it
    is ours alone or absent (a folder is created 0700 on first write)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return "unreadable", str(exc)
    kind = "folder" if folder else "entry"
    if folder and not stat.S_ISDIR(st.st_mode):
        return "not_a_folder", f"{path} is not a folder"
    if not folder and not stat.S_ISREG(st.st_mode):
        return "not_a_file", f"{path} is not a regular file (a link?)"
    if st.st_uid != os.geteuid():
        return f"{kind}_owned_by_another_user", f"{path} is owned by uid {st.st_uid}, " \
                                                f"not {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{kind}_writable_by_others", f"{path} has mode {stat.S_IMODE(st.st_mode):04o}"
    return None, ""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
