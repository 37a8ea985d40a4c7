# fleetfetch worker / producer / Flower image.
# Build stage: wheels for the project and its dependencies; the runtime stage has no build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY producer ./producer
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 FLEETFETCH_DIR=/data/downloads
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin fleetfetch \
    && mkdir -p /data/downloads && chown fleetfetch:fleetfetch /data/downloads
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/fleetfetch
STOPSIGNAL SIGTERM
# Exec form: celery is PID 1's child-less main process and receives SIGTERM itself (warm shutdown).
CMD ["celery", "-A", "tasks", "worker", "--loglevel=INFO"]
