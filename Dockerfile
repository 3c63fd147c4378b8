# syntax=docker/dockerfile:1
# The server images: the SDK and the server extras only (no torch, no exporter), run as a non-root
# user; the model directory is mounted at /model. Two final targets, picked with --target:
#   docker build --target cpu -t textgen:cpu .   python:3.11-slim with onnxruntime
#   docker build --target gpu -t textgen:gpu .   CUDA 13 + cuDNN 9 runtime with onnxruntime-gpu
# README.md (Docker) shows how to run them; tests/test_dockerfile.py lints this file with hadolint,
# checks every COPY source and installs each build stage's extras into a fresh virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# -- what the builds install from: the package's sources, nothing else ------------------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY sdk /src/sdk
COPY server /src/server
COPY export /src/export

# -- cpu ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
COPY --from=source /src /src
# pip compiles every module now: the container's root filesystem may be read-only (Kubernetes).
RUN python -m venv /opt/textgen \
    && /opt/textgen/bin/pip install --no-cache-dir "/src[server]"

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin textgen
COPY --from=cpu-build /opt/textgen /opt/textgen
ENV PATH=/opt/textgen/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# malloc maps the weights in 2 MiB pages as they load: the engine's move into them has nothing left
# to copy (server/textgen_server/huge_pages.py).
ENV GLIBC_TUNABLES=glibc.malloc.hugetlb=1
USER 10001:10001
# gRPC, then Prometheus metrics.
EXPOSE 50051 9464
# The start period covers loading the model: health answers NOT_SERVING until it is ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["textgen-healthcheck", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["textgen-server", "--model-dir", "/model", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464"]

# -- gpu ---------------------------------------------------------------------------------------------
# The CUDA images carry no Python: Ubuntu 24.04's python3 (3.12) is installed in both stages, so that
# the virtualenv made in the build stage finds its interpreter at the same path when copied.
FROM ${CUDA_IMAGE} AS cuda-python
# Unpinned apt packages: the base image's Ubuntu release fixes their versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-python AS gpu-build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=source /src /src
RUN python3 -m venv /opt/textgen \
    && /opt/textgen/bin/pip install --no-cache-dir "/src[gpu]"

FROM cuda-python AS gpu
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin textgen
COPY --from=gpu-build /opt/textgen /opt/textgen
ENV PATH=/opt/textgen/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["textgen-healthcheck", "--target", "127.0.0.1:50051"]
# --provider cuda: refuse an onnxruntime without CUDA instead of picking the CPU as `auto` would.
ENTRYPOINT ["textgen-server", "--model-dir", "/model", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--provider", "cuda"]
