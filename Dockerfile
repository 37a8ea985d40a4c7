# fleetfetch worker / producer / Flower image.
# Build stage: wheels for exactly the versions in requirements.lock (each file checked against its SHA-256 there)
# and for the project; the runtime stage has no build tools and installs nothing from the network.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY requirements.lock ./
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY producer ./producer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# tini as PID 1 reaps orphans: Celery's prefork pool waits only for the pool processes it forked (billiard waits
# on their pids), so a process re-parented to PID 1 (the child of a timed-out exec probe, a subprocess whose
# parent died) would stay a zombie. tini forwards SIGTERM to celery alone (no -g), keeping the warm shutdown.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*
# FLEETFETCH_HEARTBEAT_FILE: workers touch it for the liveness probe and keep <file>.ready for readiness
# (tasks/heartbeat.py); /tmp is writable under a read-only root file system.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 FLEETFETCH_DIR=/data/downloads \
    FLEETFETCH_HEARTBEAT_FILE=/tmp/fleetfetch-worker.alive
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin fleetfetch \
    && mkdir -p /data/downloads && chown fleetfetch:fleetfetch /data/downloads
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl && pip check && rm -rf /wheels
USER 10001
WORKDIR /home/fleetfetch
STOPSIGNAL SIGTERM
# Exec form throughout: tini is PID 1 and celery its only child, which gets SIGTERM itself (warm shutdown).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["celery", "-A", "tasks", "worker", "--loglevel=INFO"]
