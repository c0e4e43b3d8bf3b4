# syntax=docker/dockerfile:1
# diffusion-accel server images (see deploy/README.md).
#   GPU (default target): docker build -t diffusion-accel:gpu .
#   CPU (embedded tiny model): docker build --target cpu -t diffusion-accel:cpu .
# Settings come from ACCEL_* environment variables (server/settings.py); models are read from the Hugging Face
# cache at $HF_HOME (mount a volume there) or from a mounted diffusers directory named in ACCEL_MODELS.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- CPU: build a venv with the CPU torch wheel --------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY accel ./accel
COPY server ./server
COPY kernels ./kernels
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch \
    && /opt/venv/bin/pip install -c constraints.txt ".[server,redis]"

# ---- CPU runtime -----------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 accel
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/accel/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/models/hf HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE \
    ACCEL_HOST=0.0.0.0 ACCEL_PORT=8000 ACCEL_DEVICE=cpu
RUN mkdir -p /models/hf && chown -R accel /models
VOLUME ["/models"]
USER 10001
WORKDIR /home/accel
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/opt/accel/healthcheck.py"]
ENTRYPOINT ["accel-server"]

# ---- GPU: build a venv with the CUDA torch wheel and the gpu extra (xformers, triton) ------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY accel ./accel
COPY server ./server
COPY kernels ./kernels
# torch first from the CUDA index, pinned by constraints.txt; xformers and triton then resolve to builds matching it
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX}" -c constraints.txt torch \
    && /opt/venv/bin/pip install -c constraints.txt ".[server,gpu,redis]"

# ---- GPU runtime (default target): CUDA runtime libraries, no compilers -------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# the distribution's python3 (pinned by the CUDA base image's release), no compilers
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 accel
COPY --from=gpu-build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/accel/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/models/hf HF_HUB_OFFLINE=1 \
    ACCEL_HOST=0.0.0.0 ACCEL_PORT=8000 ACCEL_DEVICE=cuda
RUN mkdir -p /models/hf && chown -R accel /models
VOLUME ["/models"]
USER 10001
WORKDIR /home/accel
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 CMD ["python", "/opt/accel/healthcheck.py"]
ENTRYPOINT ["accel-server"]
