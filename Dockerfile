# sensor-predictor image.
#
#   docker build -t sensor-predictor:local .
#   docker run --rm sensor-predictor:local sensor-predictor --help
#
# Two stages: the builder resolves the locked dependencies and our package into
# /opt/venv with uv; the runtime stage gets that venv and nothing else (no uv,
# no sources, no build tools). Both stages use the same base image so the venv's
# interpreter symlink (/opt/venv/bin/python -> /usr/local/bin/python3.12) stays
# valid in the runtime stage.
#
# It builds with BuildKit and with the classic builder (DOCKER_BUILDKIT=0, e.g.
# Debian's docker.io 20.10 with a CLI that has no buildx): no `# syntax=` line and
# no `RUN --mount`. uv's cache would only help a rebuild whose uv.lock changed; an
# unchanged lock reuses the dependency layer with either builder. The base image
# is a build argument (PYTHON_IMAGE); the runtime stage needs python3.12 in
# /usr/local/bin, groupadd/useradd and find. tests/container builds and runs it.
#
# No credentials are baked in: POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE and
# friends come from the environment or compose secrets at run time.

ARG PYTHON_IMAGE=python:3.12.12-slim-trixie

# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# uv comes from PyPI, pinned (same version that wrote uv.lock).
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore uv==0.13.9

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.12 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /build

# 1) Dependencies only (cached layer as long as pyproject.toml/uv.lock do not change).
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-editable --no-install-project

# 2) Our package, installed as a regular (non-editable) wheel so the venv does
#    not point back at /build. hatchling needs README.md, and force-includes
#    migrations/ into the wheel as sensor_predictor/migrations.
COPY README.md ./
COPY src/ src/
COPY migrations/ migrations/
# uv's lock file is left behind writable by everyone (mode 0666): the runtime has no use for it.
RUN uv sync --frozen --no-dev --no-editable \
    && rm -f /opt/venv/.lock

# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sensor-predictor" \
      org.opencontainers.image.description="Scores sensor readings in PostgreSQL with an MLflow scikit-learn model" \
      org.opencontainers.image.licenses="MIT"

# Unprivileged user with a real home (mlflow/matplotlib write caches under $HOME),
# the only place it can write: the world-writable directories of the base (/tmp,
# /var/tmp, /run/lock) lose their write bit for others, and temporary files (e.g.
# the model artifacts mlflow downloads) go to $TMPDIR in the home instead.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && install -d -o app -g app -m 0700 /home/app/tmp \
    && find / -xdev -perm -0002 ! -type l -exec chmod o-w {} +

COPY --from=builder /opt/venv /opt/venv

# Non-secret defaults only; see README / compose.yaml for the full list.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/home/app/tmp \
    MLFLOW_TRACKING_URI=http://mlflow:5000 \
    POSTGRES_HOST=localhost \
    POSTGRES_PORT=5432 \
    POSTGRES_USER=sensor_user \
    POSTGRES_DB=sensor_data \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=8001 \
    LOG_LEVEL=info

# Numeric uid:gid so runtimes (e.g. Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
WORKDIR /home/app

EXPOSE 8001

# /ready answers 200 when connected, listening and a model is loaded, else 503.
# Slim images have no curl: python's urllib raises on 503/connection errors, so
# any failure exits 1. Reads METRICS_PORT so an overridden port keeps working.
# Only meaningful for `sensor-predictor run`; the one-off subcommands
# (migrate/train/simulate) should disable it (compose.yaml does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('METRICS_PORT', '8001'), timeout=4)\nexcept Exception as exc:\n    print(exc)\n    sys.exit(1)"]

CMD ["sensor-predictor", "run"]
