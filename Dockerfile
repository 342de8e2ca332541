# syntax=docker/dockerfile:1
# Build stage: a virtualenv with asyncproc and its dependencies.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY asyncproc ./asyncproc
COPY worker ./worker
RUN /opt/venv/bin/pip install .

# Runtime stage: the virtualenv, the migrations, and an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app asyncproc
COPY --from=build /opt/venv /opt/venv
COPY migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ASYNCPROC_MIGRATIONS_DIR=/app/migrations \
    ASYNCPROC_BIND=0.0.0.0:8000
WORKDIR /app
USER asyncproc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
CMD ["asyncproc", "api"]
