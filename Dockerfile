# Ponder: CPU image by default. For CUDA, pass a CUDA runtime base with Python 3.10+, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 ponder
WORKDIR /app
COPY --chown=ponder:ponder . /app
RUN pip install -c constraints.txt -e .
USER 1000

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Arguments after the image name pass through to `ponder serve` (e.g. --default-compute-budget 0.5).
ENTRYPOINT ["ponder", "serve", "--host", "0.0.0.0", "--port", "8000"]
