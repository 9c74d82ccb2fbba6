# syntax=docker/dockerfile:1
# Sluice: the HTTP message queue on PostgreSQL. `docker compose up` runs it with Postgres.

# ---- build: a wheel of the service and wheels of all its dependencies --------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
# The service depends on the client distribution (its `sluice topics|publish|tail|...`).
COPY clients/python ./clients/python
RUN pip wheel --wheel-dir /wheels ./clients/python .

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --home-dir /var/lib/sluice --no-create-home \
        --shell /usr/sbin/nologin sluice
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels sluice-mq && rm -rf /wheels

WORKDIR /var/lib/sluice
# The Alembic migrations ship inside the wheel (package sluice.migrations).
# Only used when DATABASE_URL is unset (the embedded Postgres keeps its data there).
RUN mkdir -p /var/lib/sluice && chown sluice:sluice /var/lib/sluice
ENV SLUICE_DATA_DIR=/var/lib/sluice

USER 10001:10001
EXPOSE 8000
# curl is not in the slim image; urlopen raises (exit 1) on anything but a 2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# SIGTERM drains: waiting long-polls are answered, in-flight requests finish, the pool closes.
STOPSIGNAL SIGTERM
CMD ["sluice", "serve", "--host", "0.0.0.0", "--port", "8000"]
