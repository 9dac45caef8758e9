"""The image itself: who it runs as, where that user can write, what the wheel carries."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.support import ROOT
from tests.support.docker import Docker, Image

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

HOME = "/home/app"


def run_in_image(docker: Docker, image: Image, *command: str) -> str:
    """A one-off container of the image as it is (its USER, its ENV), on the host network."""
    result = docker("run", "--rm", "--network", "host", "--no-healthcheck", image.id, *command,
                    timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_runs_as_uid_10001_and_can_write_nothing_but_its_home(
        docker: Docker, image: Image) -> None:
    config = docker.inspect(image.id)["Config"]
    assert config["User"] == "10001:10001"
    ids = run_in_image(docker, image, "sh", "-c", "id -u; id -g; echo $HOME").split()
    assert ids == ["10001", "10001", HOME]
    # Every path the image's user may write to (access(2), as the kernel decides), anywhere
    # in the image's file system; /proc, /sys and /dev are the runtime's, not the image's.
    found = run_in_image(docker, image, "sh", "-c",
                         "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune"
                         " -o -writable -print 2>/dev/null; true").split("\n")
    writable = [p for p in found if p]
    assert HOME in writable, "its home is not writable"
    outside = [p for p in writable if p != HOME and not p.startswith(HOME + "/")]
    assert outside == [], f"writable by uid 10001 outside {HOME}: {outside}"
    # Temporary files go to the home too (the system's temp directories are not writable).
    tmp = run_in_image(docker, image, "python", "-c",
                       "import tempfile; print(tempfile.mkdtemp())").strip()
    assert tmp.startswith(HOME + "/"), tmp


def test_the_migrations_are_inside_the_wheel(docker: Docker, image: Image) -> None:
    probe = (
        "import hashlib, importlib.metadata as md, json, sensor_predictor\n"
        "from sensor_predictor.migrate import migrations_dir\n"
        "d = migrations_dir()\n"
        "record = [str(f) for f in md.files('sensor-predictor') or []]\n"
        "print(json.dumps({'package': sensor_predictor.__file__, 'dir': str(d),\n"
        "  'files': {p.name: hashlib.sha256(p.read_bytes()).hexdigest()\n"
        "            for p in sorted(d.glob('*.sql'))},\n"
        "  'record': [r for r in record if '/migrations/' in r]}))\n")
    found = json.loads(run_in_image(docker, image, "python", "-c", probe))
    site = "/opt/venv/lib/python3.12/site-packages/sensor_predictor"
    assert found["package"] == f"{site}/__init__.py", found  # installed, not a source tree
    assert found["dir"] == f"{site}/migrations", found
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((ROOT / "migrations").glob("*.sql"))}
    assert expected, "no migrations in the repository"
    assert found["files"] == expected, "the image's migrations differ from migrations/"
    # Listed in the wheel's RECORD: shipped in the wheel, not copied in beside it.
    assert sorted(found["record"]) == sorted(f"sensor_predictor/migrations/{n}"
                                              for n in expected), found["record"]
    # And nothing of the build is left: no sources, no uv.
    left = run_in_image(docker, image, "sh", "-c",
                        "ls -d /build /src 2>/dev/null; command -v uv; true").split()
    assert left == [], left
