# syntax=docker/dockerfile:1
# KD Studio image: `--target cpu` (web, CPU workers) or `--target cuda` (GPU workers, CUDA build of torch).
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# Front-end libraries (uPlot) from npm's lockfile, as `make run` installs them.
FROM node:22-slim AS assets
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 kd \
    && mkdir -p /data/media /data/state && chown -R kd:kd /data
WORKDIR /app

# torch and torchvision first, from the index of the wanted build, so the project's pins are already met.
FROM base AS torch-cpu
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN pip install torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-cuda
ARG TORCH_VERSION
ARG CUDA_INDEX=cu128
ARG TORCHVISION_VERSION
RUN pip install torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} --index-url https://download.pytorch.org/whl/${CUDA_INDEX}

# The same application layers on either torch build.
FROM torch-cpu AS cpu
COPY pyproject.toml README.md ./
COPY kd_core ./kd_core
COPY webapp ./webapp
COPY workers ./workers
RUN pip install '.[web]'
COPY . .
COPY --from=assets /app/node_modules ./node_modules
USER kd
EXPOSE 8000
CMD ["uvicorn", "--host", "0.0.0.0", "--port", "8000", "--lifespan", "off", "--http", "h11", \
     "--ws", "websockets-sansio", "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--no-proxy-headers", \
     "--timeout-graceful-shutdown", "10", "webapp.asgi:application"]

FROM torch-cuda AS cuda
COPY pyproject.toml README.md ./
COPY kd_core ./kd_core
COPY webapp ./webapp
COPY workers ./workers
RUN pip install '.[web]'
COPY . .
COPY --from=assets /app/node_modules ./node_modules
USER kd
CMD ["celery", "-A", "webapp", "worker", "-Q", "gpu", "--pool", "prefork", "--concurrency", "1", "-n", "gpu@%h", "--loglevel", "INFO"]
