# The farm server, headless: clients' port 9090, web interface 8080, Prometheus metrics 9100; its job database,
# job files and rendered frames under /data (a volume). Build from the repository's root:
#   docker build -f deploy/docker/server.Dockerfile -t microfarm-server .
FROM python:3.11-slim-bookworm

# ffmpeg builds the jobs' videos; tini passes the stop signal on and reaps children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/microfarm
COPY pyproject.toml README.md LICENSE ./
COPY protocol ./protocol
COPY server_addon ./server_addon
COPY client ./client
COPY tools ./tools
RUN pip install --no-cache-dir . && rm -rf /opt/microfarm/build
COPY deploy/docker/entrypoint.py /usr/local/bin/microfarm-entrypoint

RUN groupadd --system --gid 10001 microfarm \
    && useradd --system --uid 10001 --gid microfarm --home-dir /data --shell /usr/sbin/nologin microfarm \
    && mkdir -p /data && chown microfarm:microfarm /data
USER 10001:10001
VOLUME /data

ENV MICROFARM_DATA=/data \
    MICROFARM_PORT=9090 \
    MICROFARM_WEB_PORT=8080 \
    MICROFARM_METRICS_PORT=9100 \
    PYTHONUNBUFFERED=1
EXPOSE 9090 8080 9100

HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/microfarm-entrypoint", "health-server"]
ENTRYPOINT ["tini", "--", "python", "/usr/local/bin/microfarm-entrypoint", "server"]
