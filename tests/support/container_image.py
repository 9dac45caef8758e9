"""A stand-in for `python:3.12-slim`, made on this machine (no image can be pulled here).

Debian bookworm (`debootstrap --variant=minbase`, with the shared libraries CPython's modules
load), the machine's own pyenv CPython 3.12 copied to /usr/local the way the official image
lays it out, and the machine's CA bundle (the registries may be reached through a proxy that
only that bundle trusts). It is imported once and tagged by a key of everything that goes into
it, this file included: a later run with the same inputs finds it in the daemon and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
# What python:3.12-slim-bookworm installs beside its own build (the runtime half of it).
PACKAGES = ("libssl3", "libsqlite3-0", "libffi8", "zlib1g", "libbz2-1.0", "liblzma5",
            "libuuid1", "libreadline8", "ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv"))
REPOSITORY = "sp-test-python"
ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    # uv and pip use the system bundle (the one copied in) rather than their own.
    "UV_NATIVE_TLS": "1",
    "PIP_CERT": str(CA_BUNDLE),
}
# As the official image's Dockerfile does, leave out the test suites and the static library.
_DROP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


def pyenv_python() -> Path | None:
    """The newest pyenv CPython 3.12 on this machine."""
    found = sorted(PYENV_ROOT.glob("versions/3.12.*"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
    found = [p for p in found if (p / "bin" / "python3.12").is_file()]
    return found[-1] if found else None


def debian_mirror() -> str | None:
    """The mirror apt on this machine uses for `SUITE` (debootstrap's default otherwise)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "deb" in fields.get("Types", "").split():
                return fields.get("URIs", "").split()[0] if fields.get("URIs") else None
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return next((p for p in parts[1:] if "://" in p), None)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(python: Path) -> str:
    """Everything the image is made from: recipe, suite, packages, mirror, Python, CA bundle."""
    parts = [
        _sha256(Path(__file__)), SUITE, "minbase", " ".join(PACKAGES), debian_mirror() or "",
        python.name, _sha256(python / "bin" / "python3.12"),
        *(_sha256(lib) for lib in sorted((python / "lib").glob("libpython3.12.so*"))
          if not lib.is_symlink()),
        _sha256(CA_BUNDLE) if CA_BUNDLE.is_file() else "", repr(sorted(ENV.items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """One builder at a time on this machine (another run may be making the same image)."""
    with open(Path(tempfile.gettempdir()) / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args: list[str], log: Path, **kwargs: object) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False,
                              **kwargs).returncode  # type: ignore[call-overload]
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{args[0]} exited {code} (log {log}):\n{tail}")


def _copy_python(python: Path, usr_local: Path) -> None:
    """pyenv's tree to /usr/local: site-packages holds pip only (as in the official image)."""
    site = Path("lib") / "python3.12" / "site-packages"

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel = Path(directory).relative_to(python)
        dropped = {n for n in names if n in _DROP_DIRS or re.fullmatch(r"libpython.*\.a", n)}
        if rel == site:
            dropped |= {n for n in names if not n.startswith("pip")}
        return dropped

    shutil.copytree(python, usr_local, symlinks=True, ignore=ignore, dirs_exist_ok=True)
    # The scripts' shebangs name pyenv's interpreter; in the image it is /usr/local's.
    old = re.compile(rb"^#!\s*" + re.escape(str(python).encode()) + rb"/bin/python[0-9.]*")
    for script in (usr_local / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        text = script.read_bytes()
        if old.match(text):
            script.write_bytes(old.sub(b"#!/usr/local/bin/python3.12", text, count=1))
    for link, target in (("python", "python3.12"), ("python3", "python3.12"),
                         ("pip", "pip3.12"), ("pip3", "pip3.12")):
        path = usr_local / "bin" / link
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)


def ensure_base_image(docker: str, log: Path) -> str:
    """The stand-in's tag, made now unless the daemon already has it."""
    python = pyenv_python()
    if python is None:
        raise RuntimeError(f"no pyenv CPython 3.12 under {PYENV_ROOT}/versions")
    tag = f"{REPOSITORY}:3.12-{cache_key(python)}"

    def present() -> bool:
        return subprocess.run([docker, "image", "inspect", tag], capture_output=True,
                              check=False).returncode == 0

    if present():
        return tag
    with _lock(REPOSITORY):
        if present():
            return tag
        started = time.monotonic()
        rootfs = Path(tempfile.mkdtemp(prefix="sp-rootfs-", dir="/var/tmp"))
        try:
            mirror = debian_mirror()
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  SUITE, str(rootfs), *([mirror] if mirror else [])], log)
            # No apt lists or package cache in the image, as in the official one.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            _copy_python(python, rootfs / "usr" / "local")
            _run(["chroot", str(rootfs), "/sbin/ldconfig"], log)  # finds /usr/local/lib
            shutil.copyfile(CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / CA_BUNDLE.name)
            _run(["chroot", str(rootfs), "/usr/local/bin/python3.12", "-c",
                  "import ssl, sqlite3, ctypes, zlib, bz2, lzma, uuid, readline, pip"], log)
            changes = [arg for key, value in ENV.items() for arg in ("-c", f"ENV {key}={value}")]
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            try:
                _run([docker, "import", *changes, "-c", 'CMD ["python3"]', "-", tag], log,
                     stdin=tar.stdout)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        with open(log, "a") as out:
            out.write(f"\nstand-in {tag} made in {time.monotonic() - started:.0f} s\n")
    return tag
