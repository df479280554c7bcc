# Ponder: CPU image by default. For CUDA, pass a CUDA runtime base, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 ponder
WORKDIR /app
COPY --chown=ponder:ponder . /app
RUN pip install -c constraints.txt -e .
USER 1000

# `ponder serve` replaces `generate` as the entrypoint once the server lands.
ENTRYPOINT ["ponder", "generate"]
CMD ["--device", "cpu"]
