# Two images. `server` (docker-compose.yml's prefect-server and prefect-services): the Prefect API
# and its background services with this project's pins, instead of the upstream image's unpinned
# SQLAlchemy, fastapi and prefect-redis. The last stage (the default target) is the worker image.
FROM python:3.11-slim AS server
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt prefect prefect-redis asyncpg sqlalchemy fastapi \
    && useradd --create-home --uid 1000 prefect
USER prefect
CMD ["prefect", "server", "start", "--host", "0.0.0.0", "--no-services"]

# The worker image: glm-pipeline and its pinned dependencies, ready for NVIDIA GPUs.
# torch==2.13.0 from PyPI is the CUDA build on Linux x86_64 (it bundles the CUDA runtime), and
# onnxruntime-gpu runs the exported bundles on the GPU; the host needs the NVIDIA Container Toolkit.
FROM python:3.11-slim AS worker

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_LOGGING_EXTRA_LOGGERS=glm \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

# libgomp: OpenMP for torch and sentencepiece on CPU; tini reaps torchrun's workers
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 glm
WORKDIR /app

# dependencies first, from pyproject's list and the pins: this layer survives code changes
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md prefect.yaml ./
COPY glm/ glm/
COPY tasks/ tasks/
COPY flows/ flows/
COPY configs/ configs/
COPY benchmarks/ benchmarks/
RUN pip install --no-deps . \
    && mkdir -p /app/runs /app/data \
    && chown -R glm:glm /app/runs

USER glm
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "glm-process", "--type", "process"]
