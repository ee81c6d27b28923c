# A render client on the CPU: PyPI's bpy on the CPython it is built for (bpy 5.0.x: CPython 3.11). It joins the
# server named by MICROFARM_SERVER (no zeroconf in a cluster) and stops gracefully on SIGTERM (--drain-timeout).
# Build from the repository's root:
#   docker build -f deploy/docker/client.Dockerfile -t microfarm-client .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG BPY_VERSION=5.0.1
# The X11/GL libraries bpy 5.0 links against (what ldd finds outside its own lib/) even when it renders in the
# background; tini as the init.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libx11-6 libxext6 libxrender1 libxfixes3 libxi6 \
       libxkbcommon0 libsm6 libgl1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/microfarm
COPY pyproject.toml README.md LICENSE ./
COPY protocol ./protocol
COPY server_addon ./server_addon
COPY client ./client
COPY tools ./tools
RUN pip install --no-cache-dir . "bpy==${BPY_VERSION}" && rm -rf /opt/microfarm/build
COPY deploy/docker/entrypoint.py /usr/local/bin/microfarm-entrypoint

RUN groupadd --system --gid 10001 microfarm \
    && useradd --system --uid 10001 --gid microfarm --home-dir /home/microfarm --create-home \
       --shell /usr/sbin/nologin microfarm \
    && mkdir -p /cache && chown microfarm:microfarm /cache
USER 10001:10001
VOLUME /cache

ENV MICROFARM_CACHE_DIR=/cache \
    MICROFARM_DEVICE=CPU \
    MICROFARM_DRAIN_TIMEOUT=25 \
    MICROFARM_HEALTH_FILE=/tmp/microfarm-alive \
    PYTHONUNBUFFERED=1

HEALTHCHECK --interval=20s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/microfarm-entrypoint", "health-client"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "/usr/local/bin/microfarm-entrypoint", "client"]
