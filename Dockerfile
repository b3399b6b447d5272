# syntax=docker/dockerfile:1
# The forcedphot HTTP service.
#   GPU image (default; CUDA 12 runtime, CuPy):  docker build -t forcedphot .
#   CPU image (NumPy only):                      docker build --build-arg VARIANT=cpu -t forcedphot:cpu .
# Run (demo repository, no API key needed):      docker run -p 8000:8000 [--gpus all] forcedphot
# Serve a repository:  -v /data/repo:/repository:ro -e FORCEDPHOT_REPOSITORY_ROOTS=/repository
#                      -e FORCEDPHOT_API_KEYS=<key of 16+ characters>
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# --- bases: a Python 3.12 interpreter, and which extra of the package to install -------------
FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV FORCEDPHOT_EXTRA="[gpu]"

FROM ${CPU_IMAGE} AS base-cpu
ENV FORCEDPHOT_EXTRA=""

# --- build the virtual environment --------------------------------------------------------
FROM base-${VARIANT} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY kernels/ kernels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir ".${FORCEDPHOT_EXTRA}" \
 && /opt/venv/bin/python -c "from forcedphot.kernels.fused_cpu import warm_up; warm_up()"
# (the last step compiles the fused CPU kernels once, ~20 s; numba caches them in the venv)

# --- the image: the venv only, a non-root user, data in /data -----------------------------
FROM base-${VARIANT}
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home forcedphot \
 && mkdir -p /data \
 && chown forcedphot:forcedphot /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FORCEDPHOT_DATA_DIR=/data
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8000
# /healthz answers while measurements run; /readyz (used by Kubernetes) waits for the repository
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["forcedphot", "serve", "--host", "0.0.0.0", "--port", "8000"]
