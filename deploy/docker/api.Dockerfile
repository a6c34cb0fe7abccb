# The Firstmile API/worker image: the firstmile wheel with pyproject's dependencies, without the
# `inference` extra (no torch), run as UID/GID 10001 on a read-only root filesystem. One image for
# every platform workload; the command picks the role (serve, relay, consume, scheduler, migrate).
# Built by `make images` (deploy/docker/README.md).
#
#   docker build -f deploy/docker/api.Dockerfile -t firstmile-api:0.1.0 .                      # local base
#   docker build -f deploy/docker/api.Dockerfile \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<digest> -t firstmile-api:0.1.0 .  # production
#
# BASE_IMAGE must provide CPython 3.11 as `python3` with the venv module (ensurepip), useradd and a
# POSIX shell for the build steps. Builder and runtime use the same base, so the venv's interpreter
# path is the same in both. Needs BuildKit (DOCKER_BUILDKIT=1 or buildx): cache mounts.

ARG BASE_IMAGE=firstmile/debian-base:bookworm

# The labels are on the final stage only: they change with every commit and, set earlier, would
# rebuild every stage below. hadolint asks for them on some intermediate stages (DL3049), this one.
# hadolint ignore=DL3049
FROM ${BASE_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
WORKDIR /src

# Network steps read an optional BuildKit secret `ca_bundle`: the CA bundle of a TLS-inspecting proxy
# (make images passes the host's; deploy/docker/README.md). A secret mount never lands in a layer.
# The build tools (uv, hatchling) in their own venv: they never reach the runtime stage.
COPY deploy/docker/requirements-build.txt deploy/docker/
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
      -r deploy/docker/requirements-build.txt

# Third-party dependencies, in a stage of their own: rebuilt only when the lock changes, and copied
# into the runtime as one layer that a code change leaves alone. Wheels only (no compiler in the
# image), every file checked against the lock's sha256; the cache mount keeps downloads between
# builds without putting them in a layer. Bytecode is compiled here because nothing can write it at
# run time (read-only root, PYTHONDONTWRITEBYTECODE); unchecked-hash: Python trusts these .pyc files
# without comparing source mtimes, which a copy or a re-layering of the image may change.
FROM builder AS deps
COPY deploy/docker/requirements-api.txt deploy/docker/
RUN --mount=type=cache,id=firstmile-uv,target=/root/.cache/uv --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export SSL_CERT_FILE=/run/secrets/ca_bundle; fi \
 && python3 -m venv --without-pip /opt/firstmile \
 && /opt/build/bin/uv pip install --python /opt/firstmile/bin/python --require-hashes \
      --only-binary :all: -r deploy/docker/requirements-api.txt \
 && /opt/firstmile/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/firstmile/lib

# The firstmile wheel (the admin UI's CSS, JS and templates are package data of firstmile.web:
# there is no front-end build step), installed without its dependencies: the lock has them. What it
# adds to the venv (both import packages, the dist-info, the `firstmile` script) is gathered under
# /out for a layer of its own.
FROM deps AS app
COPY pyproject.toml README.md ./
COPY platform platform
COPY inference inference
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/build/bin/uv pip install --python /opt/firstmile/bin/python --no-deps --no-cache /tmp/wheels/firstmile-*.whl \
 && /opt/build/bin/uv pip check --python /opt/firstmile/bin/python \
 && /opt/firstmile/bin/python -c "import sys, importlib.util; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && site=/opt/firstmile/lib/python3.11/site-packages \
 && /opt/firstmile/bin/python -m compileall -q --invalidation-mode unchecked-hash "$site/firstmile" "$site/firstmile_inference" \
 && mkdir -p "/out$site" /out/opt/firstmile/bin \
 && cp -a "$site/firstmile" "$site/firstmile_inference" "$site"/firstmile-*.dist-info "/out$site/" \
 && cp -a /opt/firstmile/bin/firstmile /out/opt/firstmile/bin/


FROM ${BASE_IMAGE} AS runtime
# The user exists in /etc/passwd (getpass.getuser() and friends fail for an unknown UID); its home
# is /tmp, the one writable place besides the data volume.
RUN groupadd --system --gid 10001 firstmile \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin firstmile \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/firstmile
COPY --from=deps /opt/firstmile /opt/firstmile
COPY --from=app /out/ /

# Nothing writes outside /tmp (an emptyDir or tmpfs) and FIRSTMILE_DATA_DIR (a volume when the
# embedded adapters need one; production points every store at its server). XDG_RUNTIME_DIR is a
# folder below /tmp, not /tmp: platformdirs (pgserver) accepts only one the user owns, mode 0700,
# and creates it so.
ENV PATH=/opt/firstmile/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    XDG_STATE_HOME=/tmp/.local/state \
    XDG_RUNTIME_DIR=/tmp/runtime-10001 \
    FIRSTMILE_DATA_DIR=/var/lib/firstmile
WORKDIR /var/lib/firstmile
USER 10001:10001
# 8000: the API (and its /metrics); 9090: the workers' probe and metrics port (FIRSTMILE_PROBE_PORT).
EXPOSE 8000 9090
ENTRYPOINT ["firstmile"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# Last, so that a new revision relabels the image without rebuilding a layer.
ARG BASE_IMAGE
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
LABEL org.opencontainers.image.title="firstmile-api" \
      org.opencontainers.image.description="Firstmile API and workers (serve, relay, consume, scheduler, migrate); no torch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Firstmile" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
