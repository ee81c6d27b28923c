# A render client for NVIDIA GPU nodes (CUDA, or OptiX where the driver provides it): NVIDIA's CUDA runtime image,
# with CPython 3.11 for PyPI's bpy (the Ubuntu base ships another Python). The GPU and the driver's libraries
# (libcuda, libnvoptix) come from the node through the NVIDIA container toolkit / device plugin.
# Build from the repository's root:
#   docker build -f deploy/docker/client-cuda.Dockerfile -t microfarm-client:cuda .
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG BPY_VERSION=5.0.1
ARG PYTHON_VERSION=3.11
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates software-properties-common gpg-agent tini \
       libx11-6 libxext6 libxrender1 libxfixes3 libxi6 libxkbcommon0 libsm6 libgl1 \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
    && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && "python${PYTHON_VERSION}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

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

# OptiX needs the driver's graphics libraries besides compute.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    MICROFARM_CACHE_DIR=/cache \
    MICROFARM_DEVICE=auto \
    MICROFARM_DRAIN_TIMEOUT=25 \
    MICROFARM_HEALTH_FILE=/tmp/microfarm-alive \
    PYTHONUNBUFFERED=1

HEALTHCHECK --interval=20s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/microfarm-entrypoint", "health-client"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "/usr/local/bin/microfarm-entrypoint", "client"]
