# Ponder: `ponder serve` on the embedded default model, CPU by default.
#   docker build -t ponder .
#   docker run -p 8000:8000 ponder --default-compute-budget 0.5     # arguments pass through to `ponder serve`
# For CUDA, pass a CUDA runtime base and the matching PyTorch wheel index:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t ponder:cuda .
#   docker run --gpus all -p 8000:8000 ponder:cuda --device cuda --dtype bfloat16
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH PONDER_HOST=0.0.0.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA bases ship no Python; the python base already has it. A C compiler builds the paged
# decode-attention kernel for the host's CPU at first start (under a second; without one the engine
# keeps its torch kernels). Packages follow the base's release.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 ponder

WORKDIR /app
# The same pins as CI (constraints.txt). torch first, in its own layer: it is the big one.
COPY constraints.txt ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt torch
# The source and the embedded default model (checkpoints/austen-small), read-only for the server user.
COPY . .
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt -e .

USER 10001
# The OpenAI-compatible API and Prometheus /metrics share this port.
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["ponder", "serve"]
